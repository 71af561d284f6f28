"""DVC stage `prepare`: decode data.source once into resized train/val/test tensors in data/prepared/."""

from attention_cnn.data.prepare import prepare
from attention_cnn.errors import exit_on_user_error
from attention_cnn.params import load_params


@exit_on_user_error
def main() -> None:
    params = load_params()
    report = prepare(params, out_dir="data/prepared")
    print(report.summary())


if __name__ == "__main__":
    main()

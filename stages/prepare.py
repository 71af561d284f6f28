"""DVC stage `prepare`: decode data.source once into resized train/val/test tensors in data/prepared/."""

from attention_cnn.startup import start_stage

start_stage()  # before torch: one line when this Python lacks the packages; ends with its parent

from attention_cnn.data.discover import untracked_source_warning  # noqa: E402
from attention_cnn.data.prepare import prepare  # noqa: E402
from attention_cnn.errors import exit_on_user_error  # noqa: E402
from attention_cnn.params import load_params  # noqa: E402


@exit_on_user_error
def main() -> None:
    params = load_params()
    report = prepare(params, out_dir="data/prepared")
    print(report.summary())
    warning = untracked_source_warning(params.data.source)
    if warning:
        print(warning)


if __name__ == "__main__":
    main()

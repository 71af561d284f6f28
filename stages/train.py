"""DVC stage `train`: train the attention CNN on data/prepared, write models/ and metrics/train/."""
from attention_cnn.distributed import relaunch_under_torchrun
from attention_cnn.errors import exit_on_user_error
from attention_cnn.params import load_params
from attention_cnn.train import train


@exit_on_user_error
def main() -> None:
    params = load_params()
    relaunch_under_torchrun(params.train.nproc)  # train.nproc > 1: re-run this script under torchrun, exit
    train(params, prepared_dir="data/prepared", model_path="models/model.pt",
          checkpoint_dir="models/.checkpoints", metrics_dir="metrics/train")


if __name__ == "__main__":
    main()

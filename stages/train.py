"""DVC stage `train`: train the attention CNN on data/prepared, write models/ and metrics/train/."""

from attention_cnn.startup import start_stage

start_stage()  # before torch: one line when this Python lacks the packages; ends with its parent

import sys  # noqa: E402

from attention_cnn.training.distributed import launch_under_torchrun  # noqa: E402
from attention_cnn.errors import exit_on_user_error  # noqa: E402
from attention_cnn.params import load_params  # noqa: E402
from attention_cnn.training.train import check_outputs_writable, train  # noqa: E402


@exit_on_user_error
def main() -> None:
    params = load_params()
    check_outputs_writable("models/model.pt", "models/.checkpoints", "metrics/train")
    # Several processes (train.nproc) or machines (train.nnodes; this is node 0): re-run this script under
    # torchrun, then exit.
    launch_under_torchrun(params.train, worker=sys.argv)
    train(params, prepared_dir="data/prepared", model_path="models/model.pt",
          checkpoint_dir="models/.checkpoints", metrics_dir="metrics/train")


if __name__ == "__main__":
    main()

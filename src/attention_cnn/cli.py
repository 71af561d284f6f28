"""`attention-cnn`: the command line. `attention-cnn --help` lists every command.

    attention-cnn predict --model models/model.pt --images FOLDER --out DIR   classify any folder of images
    attention-cnn train [--node-rank K]                                       the train stage, outside DVC
    attention-cnn evaluate                                                    the evaluate stage, outside DVC
    attention-cnn visualize                                                   the visualize stage, outside DVC
    attention-cnn clean [--yes]                                               list (remove) what runs left behind

train, evaluate and visualize read params.yaml and write exactly what their DVC stages write (`dvc repro` is
the usual way to run them; these are for a quick look after changing only code). With train.nnodes > 1,
`attention-cnn train --node-rank K` on machine K joins the run that `dvc repro` started on the first machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attention_cnn.errors import UserError, exit_on_user_error
from attention_cnn.params import VisualizeParams, load_params, naming_file
from attention_cnn.startup import start_command


DEFAULT_MODEL = "models/model.pt"


def checkpoint_dir(model: str) -> Path:
    """Where training checkpoints live: .checkpoints/ beside the model file."""
    return Path(model).parent / ".checkpoints"


def _check_given_model(model: str) -> None:
    """A --model the user typed that does not exist is a wrong path; only the default one is a model not yet
    trained (load_model says to run `dvc repro train`)."""
    if model != DEFAULT_MODEL and not Path(model).exists():
        raise UserError(f"--model {model}: no such file. Check the path; a model is written by `dvc repro train` "
                        f"to {DEFAULT_MODEL}.")


def _predict(args: argparse.Namespace) -> None:
    from attention_cnn.predict import predict_folder  # imported per command: `--help` stays fast

    _check_given_model(args.model)
    predict_folder(args.model, args.images, args.out, top_k=args.top_k, batch_size=args.batch_size,
                   figures=not args.no_figures, colormap=args.colormap, alpha=args.alpha, workers=args.workers,
                   explain_class=args.explain_class)


def _train(args: argparse.Namespace) -> None:
    from attention_cnn.training.distributed import launch_under_torchrun
    from attention_cnn.training.train import check_outputs_writable, train

    params = load_params(args.params)
    nnodes = params.train.nnodes
    if not 0 <= args.node_rank < nnodes:
        raise UserError(f"--node-rank {args.node_rank}: {args.params} has train.nnodes={nnodes}, so the node rank "
                        f"must be 0..{nnodes - 1} (0 is the machine that runs `dvc repro`).")
    if args.node_rank == 0:  # the machine that writes them
        check_outputs_writable(args.model, checkpoint_dir(args.model), args.metrics_dir)
    # Every torchrun worker runs this same command, and so reads the same files.
    launch_under_torchrun(params.train, node_rank=args.node_rank, worker=[
        "--module", "attention_cnn.cli", "train", "--node-rank", str(args.node_rank), "--params", args.params,
        "--prepared", args.prepared, "--model", args.model, "--metrics-dir", args.metrics_dir])
    train(params, prepared_dir=args.prepared, model_path=args.model,
          checkpoint_dir=checkpoint_dir(args.model), metrics_dir=args.metrics_dir)


def _evaluate(args: argparse.Namespace) -> None:
    from attention_cnn.evaluate import evaluate

    _check_given_model(args.model)
    result = evaluate(load_params(args.params), prepared_dir=args.prepared, model_path=args.model,
                      metrics_dir=args.metrics_dir, out_dir=args.out)
    print("\n".join(result.summary()))  # what the stage prints
    print(f"evaluate: wrote {args.metrics_dir}/metrics.json, {args.out}/")


def _visualize(args: argparse.Namespace) -> None:
    from attention_cnn.visualize import visualize

    _check_given_model(args.model)
    result = visualize(load_params(args.params), prepared_dir=args.prepared, model_path=args.model, out_dir=args.out)
    print(f"visualize: {len(result.image_files)} images and {len(result.grid_files)} class grids -> {args.out}/")


def _clean(args: argparse.Namespace) -> None:
    from attention_cnn.clean import clean

    clean(".", params_path=args.params, prepared=args.prepared, checkpoints=checkpoint_dir(args.model),
          remove=args.yes)


def _add_clean(commands: argparse._SubParsersAction) -> None:
    clean = commands.add_parser(
        "clean", help="list the disk space runs left behind (killed runs' temporary outputs, checkpoints that will "
                      "not resume); --yes removes it",
        description="List, with sizes, what runs left behind in data/, models/, metrics/ and output/: temporary "
                    "outputs of killed runs (their process is gone) and checkpoints in models/.checkpoints/ "
                    "written for other params, prepared data or code. A dry run unless --yes. Nothing else is "
                    "ever removed.")
    clean.add_argument("--yes", action="store_true", help="remove what is listed")
    clean.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    clean.add_argument("--prepared", default="data/prepared", help="prepared splits (default: %(default)s)")
    clean.add_argument("--model", default=DEFAULT_MODEL,
                       help="model file; its checkpoints are in .checkpoints/ beside it (default: %(default)s)")
    clean.set_defaults(run=_clean)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="the train stage; --node-rank K joins a several-machine run (train.nnodes) as machine K",
        description="The train stage, outside DVC: writes --model and --metrics-dir (process 0 only). With "
                    "train.nnodes > 1 in params.yaml, run it with --node-rank K on machine K = 1.. while "
                    "`dvc repro` runs node 0 on the first machine, at train.rdzv_endpoint.")
    train.add_argument("--node-rank", type=int, default=0,
                       help="this machine's number, 0..train.nnodes-1 (default: %(default)s)")
    train.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    train.add_argument("--prepared", default="data/prepared", help="prepared splits (default: %(default)s)")
    train.add_argument("--model", default=DEFAULT_MODEL, help="model written by rank 0; the checkpoint goes "
                                                                  "beside it, in .checkpoints/ (default: %(default)s)")
    train.add_argument("--metrics-dir", default="metrics/train",
                       help="DVCLive folder, written by rank 0 (default: %(default)s)")
    train.set_defaults(run=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attention-cnn",
        description="A CNN with learned soft attention: predict on any folder, train, evaluate, visualize.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict", help="classify every image in a folder; write predictions.csv and a before/after figure each",
        description="Classify every image file under --images (recursively; labelled or not) and write "
                    "predictions.csv, skipped.csv and one input|before|mask|after figure per image into --out.")
    predict.add_argument("--model", default=DEFAULT_MODEL, help="trained model file (default: %(default)s)")
    predict.add_argument("--images", required=True, help="folder of images, searched recursively")
    predict.add_argument("--out", required=True, help="output folder, replaced as a whole (refused when it holds "
                                                      "other files, or is --images or above it)")
    predict.add_argument("--top-k", type=int, default=None,
                         help="classes listed per image (default: up to 3, fewer when the model has fewer)")
    predict.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: %(default)s)")
    predict.add_argument("--no-figures", action="store_true", help="write the CSV files only (much faster)")
    predict.add_argument("--colormap", default=VisualizeParams.colormap,
                         help="matplotlib colormap of the figures (default: %(default)s)")
    predict.add_argument("--alpha", type=float, default=VisualizeParams.alpha,
                         help="overlay opacity of the figures (default: %(default)s)")
    predict.add_argument("--workers", type=int, default=0, help="decode processes; 0 = one per core (default)")
    predict.add_argument("--explain-class", default="predicted",
                         help="the class whose native map each figure draws: predicted, runner-up, or a class "
                              "name (default: %(default)s)")
    predict.set_defaults(run=_predict)

    _add_train(commands)

    for name, run, helptext in (("evaluate", _evaluate, "the evaluate stage: test metrics, attention quality, "
                                                        "confusion matrix, misclassified gallery"),
                                ("visualize", _visualize, "the visualize stage: before/after figures and class grids")):
        sub = commands.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        sub.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
        sub.add_argument("--prepared", default="data/prepared", help="prepared splits (default: %(default)s)")
        sub.add_argument("--model", default=DEFAULT_MODEL, help="trained model (default: %(default)s)")
        if name == "evaluate":
            sub.add_argument("--metrics-dir", default="metrics/evaluate",
                             help="DVCLive folder, replaced as a whole (default: %(default)s)")
            sub.add_argument("--out", default="output/evaluate",
                             help="plots folder, replaced as a whole (default: %(default)s)")
        else:
            sub.add_argument("--out", default="output/visualize",
                             help="figures folder, replaced as a whole (default: %(default)s)")
        sub.set_defaults(run=run)
    _add_clean(commands)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """The command line (`attention-cnn`, `python -m attention_cnn.cli`); `argv` given: a call from Python (tests,
    a notebook), which keeps its own signal handlers."""
    if argv is None:
        start_command()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as exc:  # also the checks made later, by train, of what the params ask for
        raise naming_file(exc, getattr(args, "params", "params.yaml")) from None


if __name__ == "__main__":
    main()

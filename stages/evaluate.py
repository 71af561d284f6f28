"""DVC stage `evaluate`: score models/model.pt on the test split; write metrics/evaluate/ and output/evaluate/."""

from attention_cnn.startup import start_stage

start_stage()  # before torch: one line when this Python lacks the packages; ends with its parent

from attention_cnn.errors import exit_on_user_error  # noqa: E402
from attention_cnn.evaluate import evaluate  # noqa: E402
from attention_cnn.metrics import not_learned_warning  # noqa: E402
from attention_cnn.params import load_params  # noqa: E402


@exit_on_user_error
def main() -> None:
    params = load_params()
    result = evaluate(params, prepared_dir="data/prepared", model_path="models/model.pt",
                      metrics_dir="metrics/evaluate", out_dir="output/evaluate")
    print(f"evaluate: test accuracy {result.metrics['accuracy']:.4f}, macro F1 {result.metrics['macro/f1']:.4f}")
    report = result.report
    if "verdict" in result.explained:
        print(f"evaluate: {result.explained['verdict']}")
    warning = not_learned_warning("test accuracy", report.accuracy, len(report.per_class), len(report.predictions))
    if warning:
        print(warning)


if __name__ == "__main__":
    main()

"""DVC stage `visualize`: before/after attention figures of test images and one grid per class, in output/visualize/."""

from attention_cnn.startup import start_stage

start_stage()  # before torch: one line when this Python lacks the packages; ends with its parent

from attention_cnn.errors import exit_on_user_error  # noqa: E402
from attention_cnn.params import load_params  # noqa: E402
from attention_cnn.visualize import visualize  # noqa: E402


@exit_on_user_error
def main() -> None:
    params = load_params()
    result = visualize(params, prepared_dir="data/prepared", model_path="models/model.pt", out_dir="output/visualize")
    print(f"visualize: {len(result.image_files)} images and {len(result.grid_files)} class grids in output/visualize/")


if __name__ == "__main__":
    main()

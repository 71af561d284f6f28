"""DVC stage `visualize`: before/after attention figures of test images and one grid per class, in output/visualize/."""
from attention_cnn.errors import exit_on_user_error
from attention_cnn.params import load_params
from attention_cnn.visualize import visualize


@exit_on_user_error
def main() -> None:
    params = load_params()
    result = visualize(params, prepared_dir="data/prepared", model_path="models/model.pt", out_dir="output/visualize")
    print(f"visualize: {len(result.image_files)} images and {len(result.grid_files)} class grids in output/visualize/")


if __name__ == "__main__":
    main()

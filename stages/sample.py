"""DVC stage `sample`: draw the built-in dataset into data/sample (images and ground-truth masks)."""

from attention_cnn.startup import start_stage

start_stage()  # before torch: one line when this Python lacks the packages; ends with its parent

from attention_cnn.data.sample import write_sample  # noqa: E402
from attention_cnn.errors import exit_on_user_error  # noqa: E402
from attention_cnn.params import load_params  # noqa: E402


@exit_on_user_error
def main() -> None:
    params = load_params()
    out = write_sample("data/sample", seed=params.seed, images_per_class=params.sample.images_per_class,
                       image_size=params.sample.image_size, jpeg_quality=params.sample.jpeg_quality)
    print(f"sample: {params.sample.images_per_class} images per class in {out}")


if __name__ == "__main__":
    main()

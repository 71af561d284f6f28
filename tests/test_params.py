import dataclasses
from pathlib import Path

import pytest
import yaml

from attention_cnn.params import ParamsError, load_params, parse_params, training_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_has_the_documented_keys():
    params = load_params(REPO / "params.yaml")
    assert params.img_size > 0 and params.seed >= 0
    assert params.data.source == "data/sample"
    assert params.model.attention == "conv"
    assert params.train.epochs == "auto" and params.train.steps >= 1 and params.train.batch_size >= 1
    assert params.model.head == "gmp"


def test_missing_keys_take_defaults_and_ints_are_accepted_for_floats():
    params = parse_params({"train": {"lr": 1}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.model.attention == "conv"


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        ({"img_size": "big"}, "'img_size'", "an integer"),
        ({"img_size": 8}, "'img_size'", ">= 16"),
        ({"train": {"epochs": 0}}, "'train.epochs'", "'auto' or an integer >= 1"),
        ({"train": {"epochs": True}}, "'train.epochs'", "'auto' or an integer"),
        ({"train": {"epochs": "many"}}, "'train.epochs'", "'auto' or an integer"),
        ({"model": {"head": "mlp"}}, "'model.head'", "'gmp', 'gap', 'flatten'"),
        ({"model": {"class_window": 2}}, "'model.class_window'", "must be odd"),
        ({"train": {"flip": "vertical"}}, "'train.flip'", "'horizontal', 'both', 'none'"),
        ({"train": {"rotate": 200}}, "'train.rotate'", "<= 180.0"),
        ({"train": {"label_smoothing": 1}}, "'train.label_smoothing'", "< 1.0"),
        ({"train": {"augment": "yes"}}, "'train.augment'", "true or false"),
        ({"model": {"attention": "softmax"}}, "'model.attention'", "'none', 'dense', 'conv', 'spatial', 'ltpa'"),
        ({"data": {"resize": "squash"}}, "'data.resize'", "'stretch', 'center_crop', 'pad'"),
        ({"data": {"val_fraction": 0}}, "'data.val_fraction'", "> 0.0"),
        ({"train": {"device": "tpu"}}, "'train.device'", "'auto', 'cpu', 'cuda'"),
        ({"train": {"nnodes": 0}}, "'train.nnodes'", ">= 1"),
        ({"train": {"rdzv_endpoint": "node0"}}, "'train.rdzv_endpoint'", "host:port of the first machine"),
        ({"train": {"rdzv_endpoint": "node0:http"}}, "'train.rdzv_endpoint'", "host:port"),
        ({"train": {"rdzv_endpoint": "node0:70000"}}, "'train.rdzv_endpoint'", "host:port"),
        ({"train": {"rdzv_endpoint": ":29500"}}, "'train.rdzv_endpoint'", "host:port"),
        ({"train": {"rdzv_endpoint": 29500}}, "'train.rdzv_endpoint'", "host:port"),
        ({"train": {"rdzv_timeout": 0}}, "'train.rdzv_timeout'", ">= 1"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(raw, key, allowed):
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert key in str(info.value) and allowed in str(info.value)


def test_unknown_keys_are_refused_with_the_allowed_list():
    with pytest.raises(ParamsError, match=r"unknown key 'train.epoch'.*Allowed keys: epochs, steps, val_every, batch_size"):
        parse_params({"train": {"epoch": 3}})
    with pytest.raises(ParamsError, match=r"unknown key 'imgsize'"):
        parse_params({"imgsize": 64})


def test_section_must_be_a_mapping():
    with pytest.raises(ParamsError, match=r"section 'train' must be a mapping"):
        parse_params({"train": 5})


def test_fractions_must_leave_training_data():
    with pytest.raises(ParamsError, match=r"val_fraction' \+ 'data.test_fraction"):
        parse_params({"data": {"val_fraction": 0.45, "test_fraction": 0.45}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_source_path_is_repo_relative_or_absolute(tmp_path):
    rel = parse_params({"data": {"source": "images"}})
    assert rel.source_path(tmp_path) == tmp_path / "images"
    absolute = parse_params({"data": {"source": str(tmp_path / "x")}})
    assert absolute.source_path("/elsewhere") == tmp_path / "x"


def test_params_round_trip_through_yaml():
    params = parse_params({"seed": 7, "model": {"attention": "ltpa"}})
    assert parse_params(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(params)))) == params


@pytest.mark.parametrize("endpoint", ["10.0.0.1:29500", "node0.cluster:29500", "[fd00::1]:29500", "localhost:1"])
def test_rdzv_endpoint_accepts_what_torchrun_accepts(endpoint):
    assert parse_params({"train": {"nnodes": 2, "rdzv_endpoint": endpoint}}).train.rdzv_endpoint == endpoint


def test_several_machines_need_the_endpoint_of_the_first():
    assert parse_params({"train": {"nnodes": 1}}).train.rdzv_endpoint == ""
    with pytest.raises(ParamsError, match=r"'train.nnodes' is 2, so 'train.rdzv_endpoint' must be host:port"):
        parse_params({"train": {"nnodes": 2}})


def test_training_params_leave_out_where_the_machines_meet_but_not_how_many_they_are():
    here = parse_params({"train": {"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500", "rdzv_timeout": 60}})
    there = parse_params({"train": {"nnodes": 2, "rdzv_endpoint": "node0:29501"}})
    assert training_params(here) == training_params(there)
    assert training_params(here) != training_params(parse_params({"train": {"nnodes": 3, "rdzv_endpoint": "a:1"}}))
    assert training_params(here)["train"]["nnodes"] == 2 and training_params(here)["seed"] == here.seed

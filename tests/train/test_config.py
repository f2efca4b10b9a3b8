"""JobConfig: TOML loading, --section.key overrides, one-line errors, --print-config."""

from __future__ import annotations

import pathlib

import pytest

from runtime import errors
from runtime.errors import ConfigError
from runtime.model.args import FLAVORS
import runtime.train.config as config_package
from runtime.plan import build_arg_parser
from runtime.plan import main as plan_main
from runtime.train.config.loader import config_from_dict, load_config, parse_args
from runtime.train.config.schema import SECTIONS, JobConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.toml"))


def write(tmp_path, text: str, name: str = "x.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- defaults

def test_defaults_are_valid_and_match_the_documented_values():
    cfg = load_config(None, [])
    assert cfg == JobConfig()
    cfg.validate()
    assert cfg.job.dump_folder == "./outputs"
    m, t = cfg.model, cfg.training
    assert (m.flavor, m.n_layers, m.load_balance_coeff) == ("debugmodel", 0, 1e-3)
    assert (t.steps, t.seq_len, t.global_batch_size) == (100, 256, -1)
    assert cfg.optimizer.no_decay == ["norms", "biases", "sinks", "embeddings"]
    assert cfg.parallelism.data_parallel_shard_degree == -1
    assert cfg.parallelism.pipeline_parallel_schedule == "1F1B"
    assert cfg.compile.components == ["model", "loss"]
    assert cfg.quantize.filter_fqns == ["output", "router"]
    assert list(SECTIONS) == ["job", "model", "data", "training", "optimizer", "lr_scheduler",
                              "parallelism", "checkpoint", "validation", "activation_checkpoint",
                              "compile",
                              "quantize", "metrics", "profiling", "lora"]


def test_list_defaults_are_not_shared():
    a, b = JobConfig(), JobConfig()
    a.optimizer.no_decay.append("x")
    assert b.optimizer.no_decay == ["norms", "biases", "sinks", "embeddings"]


# --------------------------------------------------------------------------- overrides

def test_overrides_of_every_type():
    cfg = load_config(None, [
        "--training.steps=10",                 # int
        "--optimizer.lr=3e-4",                 # float
        "--optimizer.weight_decay=0",          # int accepted for float
        "--model.flavor=tiny",                 # bare string
        "--data.dataset_path=a.jsonl",         # bare string with a dot
        "--data.dataset=path",
        '--job.description="a b"',             # quoted TOML string
        "--activation_checkpoint.selective_ac_option=2",  # digits kept as text for a str field
        "--data.hf_streaming=false",           # bool
        "--compile.enable",                    # bare flag = true
        "--compile.components=[\"model\"]",    # TOML list
        "--optimizer.no_decay=norms,biases",   # comma list
        "--quantize.filter_fqns=",             # empty list
    ])
    assert cfg.training.steps == 10
    assert cfg.optimizer.lr == 3e-4
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.model.flavor == "tiny"
    assert cfg.data.dataset_path == "a.jsonl"
    assert cfg.job.description == "a b"
    assert cfg.activation_checkpoint.selective_ac_option == "2"
    assert cfg.data.hf_streaming is False
    assert cfg.compile.enable is True
    assert cfg.compile.components == ["model"]
    assert cfg.optimizer.no_decay == ["norms", "biases"]
    assert cfg.quantize.filter_fqns == []


def test_override_spellings():
    cfg = load_config(None, [
        "--training.steps", "7",                       # space-separated value
        "--parallelism.data_parallel_shard_degree", "-1",  # a negative value is a value
        "--training.local-batch-size=3",               # hyphens read as underscores
        "--compile.enable", "true",                    # flag with an explicit value
        "--metrics.enable_jsonl", "False",             # case-insensitive booleans
        "--training.seed=1", "--training.seed=2",      # the last one wins
    ])
    assert cfg.training.steps == 7
    assert cfg.parallelism.data_parallel_shard_degree == -1
    assert cfg.training.local_batch_size == 3
    assert cfg.compile.enable is True
    assert cfg.metrics.enable_jsonl is False
    assert cfg.training.seed == 2


def test_overrides_beat_the_file_and_can_fix_its_values(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 0\nseq_len = 64\n")
    cfg = load_config(path, ["--training.steps=5"])
    assert (cfg.training.steps, cfg.training.seq_len) == (5, 64)


def test_file_values_and_int_for_float(tmp_path):
    path = write(tmp_path, '[optimizer]\nlr = 1\nno_decay = ["sinks"]\n[training]\nmax_norm = 2\n')
    cfg = load_config(path, [])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.no_decay == ["sinks"]
    assert cfg.training.max_norm == 2.0


# --------------------------------------------------------------------------- file errors

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    assert error_of(path) == f"{path}: config file not found"


def test_malformed_toml(tmp_path):
    path = write(tmp_path, "[training]\nsteps = \n")
    message = error_of(path)
    assert message.startswith(f"{path}: malformed TOML: ")
    assert "line 2" in message


def test_section_must_be_a_table(tmp_path):
    path = write(tmp_path, "training = 3\n")
    assert error_of(path) == f"{path}: 'training' must be a [training] table, got 3"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[trainig]\nsteps = 1\n")
    assert error_of(path) == f"{path}: unknown section 'trainig' (did you mean 'training'?)"
    path = write(tmp_path, "[float8]\nemulate = true\n")
    assert error_of(path) == f"{path}: unknown section 'float8' (did you mean 'quantize'?)"
    path = write(tmp_path, "[zzz]\n")
    assert error_of(path) == (
        f"{path}: unknown section 'zzz' (sections: job, model, data, training, optimizer, "
        f"lr_scheduler, parallelism, checkpoint, validation, activation_checkpoint, compile, "
        f"quantize, metrics, profiling, lora)")


def test_unknown_key(tmp_path):
    path = write(tmp_path, "[training]\nstepz = 1\n")
    assert error_of(path) == (
        f"{path}: unknown key 'training.stepz' (did you mean 'training.steps'?)")
    # torchtitan keeps the dataset under [training]; here it has its own section.
    path = write(tmp_path, '[training]\ndataset_path = "a"\n')
    assert error_of(path) == (
        f"{path}: unknown key 'training.dataset_path' (did you mean 'data.dataset_path'?)")
    path = write(tmp_path, "[training]\nqqqq = 1\n")
    assert error_of(path) == f"{path}: unknown key 'training.qqqq'"


@pytest.mark.parametrize("line, message", [
    ('steps = "ten"', "training.steps must be an integer, got 'ten'"),
    ("steps = 1.5", "training.steps must be an integer, got 1.5"),
    ("steps = true", "training.steps must be an integer, got True"),
    ('max_norm = "1"', "training.max_norm must be a finite number, got '1'"),
    ("max_norm = inf", "training.max_norm must be a finite number, got inf"),
    ("device = 1", "training.device must be a string, got 1"),
    ("deterministic = 1", "training.deterministic must be true or false, got 1"),
])
def test_wrong_type_in_file(tmp_path, line, message):
    path = write(tmp_path, f"[training]\n{line}\n")
    assert error_of(path) == f"{path}: {message}"


def test_wrong_list_type_in_file(tmp_path):
    path = write(tmp_path, "[optimizer]\nno_decay = [1]\n")
    assert error_of(path) == f"{path}: optimizer.no_decay must be a list of strings, got [1]"
    path = write(tmp_path, '[optimizer]\nno_decay = "norms"\n')
    assert error_of(path) == f"{path}: optimizer.no_decay must be a list of strings, got 'norms'"


# --------------------------------------------------------------------------- override errors

@pytest.mark.parametrize("args, message", [
    (["--training.stepz=1"], "unknown key '--training.stepz' (did you mean '--training.steps'?)"),
    (["--trainig.steps=1"], "unknown section '--trainig' (did you mean '--training'?)"),
    (["--training.dataset=hf"],
     "unknown key '--training.dataset' (did you mean '--data.dataset'?)"),
    (["--training.steps=ten"], "--training.steps must be an integer, got 'ten'"),
    (["--training.steps=1.5"], "--training.steps must be an integer, got '1.5'"),
    (["--training.steps="], "--training.steps must be an integer, got ''"),
    (["--optimizer.lr=fast"], "--optimizer.lr must be a finite number, got 'fast'"),
    (["--optimizer.lr=nan"], "--optimizer.lr must be a finite number, got 'nan'"),
    (["--compile.enable=yes"], "--compile.enable must be true or false, got 'yes'"),
    (["--training.steps"], "--training.steps needs a value"),
    (["steps=3"], "unexpected argument 'steps=3' (overrides look like --section.key=value)"),
    (["--steps=3"], "unexpected argument '--steps=3' (overrides look like --section.key=value)"),
])
def test_override_errors(args, message):
    assert error_of(None, args) == f"command line: {message}"


# --------------------------------------------------------------------------- value errors

@pytest.mark.parametrize("override, message", [
    ("training.steps=0", "must be > 0, got 0"),
    ("training.seq_len=-4", "must be > 0, got -4"),
    ("training.local_batch_size=0", "must be > 0, got 0"),
    ("training.global_batch_size=0",
     "must be -1 (local_batch_size x data-parallel degree) or > 0, got 0"),
    ("training.max_norm=-1", "must be >= 0, got -1.0"),
    ("training.device=tpu", "must be one of auto, cpu, cuda, got 'tpu'"),
    ("training.on_nonfinite=ignore", "must be one of error, skip, got 'ignore'"),
    ("model.flavor=7b", "must be one of " + ", ".join(FLAVORS) + ", got '7b'"),
    ("model.n_layers=-1", "must be >= 0, got -1"),
    ("model.attn_backend=sdpa", "must be one of auto, flex, math, got 'sdpa'"),
    ("model.load_balance_coeff=-0.1", "must be >= 0, got -0.1"),
    ("optimizer.lr=0", "must be > 0, got 0.0"),
    ("optimizer.beta2=1", "must be in [0, 1), got 1.0"),
    ("optimizer.no_decay=norms,weights",
     "entries must be in ['norms', 'biases', 'sinks', 'embeddings'], got ['norms', 'weights']"),
    ("optimizer.implementation=cuda", "must be one of auto, fused, foreach, for-loop, got 'cuda'"),
    ("lr_scheduler.warmup_steps=-1", "must be >= 0, got -1"),
    ("lr_scheduler.decay_ratio=1.5", "must be in [0, 1], got 1.5"),
    ("lr_scheduler.decay_type=cos", "must be one of linear, cosine, wsd, constant, got 'cos'"),
    ("parallelism.tensor_parallel_degree=0", "must be >= 1, got 0"),
    ("parallelism.data_parallel_shard_degree=0",
     "must be -1 (infer from the world size) or >= 1, got 0"),
    ("parallelism.data_parallel_shard_degree=-2",
     "must be -1 (infer from the world size) or >= 1, got -2"),
    ("parallelism.pipeline_parallel_schedule=1f1b",
     "must be one of GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble, "
     "DualPipeV, got '1f1b'"),
    ("parallelism.pipeline_parallel_layers_per_stage=0", "must be -1 (auto) or >= 1, got 0"),
    ("checkpoint.keep_latest_k=-1", "must be >= 0, got -1"),
    ("checkpoint.load_step=-2", "must be -1 (latest) or >= 0, got -2"),
    ("checkpoint.async_mode=async_with_pinned_mem",
     "must be one of disabled, async, got 'async_with_pinned_mem'"),
    ("activation_checkpoint.selective_ac_option=0",
     "must be 'op' or a positive integer N (checkpoint every N-th layer), got '0'"),
    ("compile.components=model,optimizer", "entries must be in ['model', 'loss'], "
     "got ['model', 'optimizer']"),
    ("quantize.mode=fp8", "must be one of none, float8, mxfp8, got 'fp8'"),
    ("metrics.log_freq=0", "must be > 0, got 0"),
    ("job.dump_folder=", "must not be empty, got ''"),
])
def test_impossible_values_on_the_command_line(override, message):
    key = override.split("=")[0]
    assert error_of(None, [f"--{override}"]) == f"command line: --{key} {message}"


def test_impossible_values_in_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 0\n")
    assert error_of(path) == f"{path}: training.steps must be > 0, got 0"


@pytest.mark.parametrize("text, overrides, message", [
    ('[data]\ndataset = "path"\n', [],
     "{path}: data.dataset is 'path' but data.dataset_path is empty"),
    ("", ["--data.dataset=hf"],
     "command line: --data.dataset is 'hf' but data.hf_dataset is empty"),
    ("[training]\nlocal_batch_size = 8\n", ["--training.global_batch_size=12"],
     "command line: --training.global_batch_size (12) must be a multiple of "
     "training.local_batch_size (8)"),
    ("", ["--training.seq_len=8192"],
     "command line: --training.seq_len (8192) exceeds the max_seq_len (4096) of model flavor "
     "'debugmodel'"),
    ("[parallelism]\npipeline_parallel_degree = 2\npipeline_parallel_microbatch_size = 3\n", [],
     "{path}: training.local_batch_size (8) must be a multiple of "
     "parallelism.pipeline_parallel_microbatch_size (3)"),
    ("", ["--parallelism.enable_async_tensor_parallel"],
     "command line: --parallelism.enable_async_tensor_parallel needs compile.enable = true with "
     "'model' in compile.components (async TP is a compiler pass)"),
    ('[checkpoint]\ninitial_load_hf = "a"\ninitial_load_path = "b"\n', [],
     "{path}: checkpoint.initial_load_hf and checkpoint.initial_load_path are mutually exclusive"),
    ('[quantize]\nmode = "float8"\nenable_fsdp_float8_all_gather = true\n',
     ["--quantize.float8_recipe=rowwise"],
     "{path}: quantize.enable_fsdp_float8_all_gather needs --quantize.float8_recipe = "
     "'tensorwise', got 'rowwise'"),
])
def test_cross_key_rules(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    assert error_of(path, overrides) == message.format(path=path)


def test_validate_catches_python_edits():
    cfg = JobConfig()
    cfg.training.steps = "10"
    with pytest.raises(ConfigError, match=r"^config: training.steps must be an integer, got '10'$"):
        cfg.validate()
    cfg.training.steps = 10
    cfg.lr_scheduler.decay_type = "exp"
    with pytest.raises(ConfigError, match=r"^config: lr_scheduler.decay_type must be one of"):
        cfg.validate()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- derived values

def test_model_args_from_the_flavor_with_overrides():
    cfg = load_config(None, ["--model.flavor=20b", "--model.n_layers=2", "--model.moe_impl=loop",
                             "--model.load_balance_coeff=0", "--model.aux_loss_coeff=0.01"])
    args = cfg.model_args()
    assert (args.dim, args.num_experts, args.vocab_size) == (2880, 32, 201088)
    assert args.n_layers == 2 and args.moe_impl == "loop"
    assert args.load_balance_coeff is None  # 0 disables the expert-bias update
    assert args.aux_loss_coeff == 0.01
    assert FLAVORS["20b"].n_layers == 24  # the flavor table is not modified
    assert load_config(None, []).model_args().n_layers == FLAVORS["debugmodel"].n_layers


def test_gradient_accumulation_steps():
    overrides = ["--training.local_batch_size=2", "--training.global_batch_size=16"]
    t = load_config(None, overrides).training
    assert t.gradient_accumulation_steps(4) == 2
    assert t.gradient_accumulation_steps(8) == 1
    with pytest.raises(ConfigError) as info:
        t.gradient_accumulation_steps(3)
    assert str(info.value) == ("training.global_batch_size (16) must be a multiple of "
                               "training.local_batch_size (2) x data-parallel degree (3) = 6")
    assert load_config(None, []).training.gradient_accumulation_steps(5) == 1


# --------------------------------------------------------------------------- print-config

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(tmp_path, path):
    cfg = load_config(str(path), [])
    cfg.model_args()
    again = load_config(write(tmp_path, cfg.to_toml_str()), [])
    assert again == cfg


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"debugmodel.toml", "gptoss_20b.toml", "gptoss_120b.toml"} <= names


def test_round_trip_of_awkward_values(tmp_path):
    cfg = load_config(None, ['--job.description="quote \\" back\\\\slash tab\\t é ✓"',
                             "--optimizer.lr=1e-08", "--quantize.filter_fqns=[]"])
    assert cfg.job.description == 'quote " back\\slash tab\t é ✓'
    cfg.job.dump_folder = "out\x7fdel\nline"
    again = load_config(write(tmp_path, cfg.to_toml_str()), [])
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_parse_args_and_print_config(tmp_path, capsys):
    path = write(tmp_path, "[training]\nsteps = 3\n")
    cfg, ns = parse_args(["--config", path, "--print-config", "--training.seed=4"])
    assert ns.print_config and ns.config == path
    assert (cfg.training.steps, cfg.training.seed) == (3, 4)
    cfg2, ns2 = parse_args([f"--job.config_file={path}"])  # torchtitan's spelling
    assert ns2.config == path and not ns2.print_config and cfg2.training.steps == 3
    assert parse_args([])[0] == JobConfig()


def test_plan_prints_the_resolved_toml_and_checks_the_mesh(tmp_path, capsys):
    # runtime.plan is the one command that validates a config and its mesh (the config
    # package has no CLI of its own).
    argv = ["--config", str(CONFIGS / "gptoss_120b.toml"), "--world-size", "128"]
    assert plan_main(argv + ["--print-config"]) == 0
    out = capsys.readouterr().out
    assert load_config(write(tmp_path, out), []) == load_config(str(CONFIGS / "gptoss_120b.toml"))
    assert plan_main(argv + ["--check-only"]) == 0
    assert capsys.readouterr().out.endswith(
        "mesh valid for 128 ranks: dp_replicate=1 dp_shard=128 cp=1 tp=1 pp=1 ep=8 etp=1\n")


def test_report_config_error_prints_one_line_and_returns_2(capsys):
    with pytest.raises(ConfigError) as info:
        parse_args(["--training.stepz=1"])
    assert errors.report_config_error(info.value) == errors.EXIT_CONFIG_ERROR == 2
    err = capsys.readouterr().err
    assert err == ("error: command line: unknown key '--training.stepz' "
                   "(did you mean '--training.steps'?)\n")


def test_argparse_usage_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"^command line: argument --world-size: invalid int "
                                          r"value: 'x' \(see python -m runtime.plan --help\)$"):
        parse_args(["--world-size", "x"], build_arg_parser())


def test_plan_rejects_a_bad_world_size_in_one_line(capsys):
    assert plan_main(["--config", str(CONFIGS / "gptoss_20b.toml"), "--world-size", "12",
                      "--check-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parallelism.expert_parallel_degree (8)")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_config_package_has_no_command_line_of_its_own():
    assert not hasattr(config_package, "main") and not hasattr(config_package, "main_guard")


def test_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[training]\nsteps = 7\n")
    assert load_config(str(path), []).training.steps == 7
    path.write_bytes(b"\xef\xbb\xbf[training]\nsteps = \xff\n")  # not UTF-8 after the mark
    assert "malformed TOML" in error_of(str(path))

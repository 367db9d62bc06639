"""Generate the Triton model repository from comrecycle.specs (the one source of truth).

Three variants come from the same specs:
  cpu        (default, embedded tritonserver from nvidia-pytriton): stages are Python-backend
             models running their ONNX file with onnxruntime on CPU (KIND_CPU)
  gpu        the same Python-backend models on KIND_GPU with the CUDA execution provider
  container  the official Triton container: stages use the native onnxruntime backend on
             KIND_GPU (no Python in the stage hop); ensembles unchanged

Each stage: dynamic batching, variable-length id lists allowed ragged (the Python model
pads them into one onnxruntime call). Ensembles: `cascade` (all four stages),
`cascade_from_prerank`, `cascade_from_rank`; `rerank` is called directly for strategy 3.
Every ensemble also outputs the intermediate stage outputs the recycling cache stores.

A served repository is a build output: `build_models.py` (or `comrecycle build-models`) writes
the configs and installs the ONNX files into artifacts/model_repository/<variant>/
(DEFAULT_REPOSITORY); `install-estimator` and `install-params` add versions there. The configs
of every variant are also committed, for reading, under model_repository/ and
deploy/<variant>/model_repository/ (COMMITTED_CONFIGS); a test regenerates them and fails on
any difference. Configs are written with protobuf ModelConfig + text_format.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .serving.layout import installed_versions  # noqa: F401 (part of this module's API)
from .serving.backends import ESTIMATOR_BACKEND, ROUTER_BACKEND, STAGE_BACKEND
from .settings import SERVING, RouterSettings
from .specs import (CONTEXT, CascadeSizes, ESTIMATOR_INPUTS, ESTIMATOR_OUTPUTS,
                    EXCLUDE_ITEMS, EnsembleSpec, ROUTER, ROUTER_INPUTS, ROUTER_OUTPUTS,
                    STAGES, StageSpec, TensorSpec, ensemble_specs, items_out, scores_out,
                    stage_specs)
from .errors import UserError

log = logging.getLogger(__name__)
VARIANTS = ("cpu", "gpu", "container")
REPO_ROOT = Path(__file__).resolve().parents[1]
# the generated configs, committed for reading (regeneration is checked by a test)
COMMITTED_CONFIGS = {"cpu": REPO_ROOT / "model_repository",
                     "gpu": REPO_ROOT / "deploy" / "gpu" / "model_repository",
                     "container": REPO_ROOT / "deploy" / "container" / "model_repository"}
# the repositories the build writes and the servers serve (configs + weights + params)
DEFAULT_REPOSITORY = {v: REPO_ROOT / "artifacts" / "model_repository" / v for v in VARIANTS}
MODEL_VERSION = 1
_DTYPE = {"int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32, "float64": mc.TYPE_FP64}


def _input(t: TensorSpec, ragged: bool) -> mc.ModelInput:
    return mc.ModelInput(name=t.name, data_type=_DTYPE[t.dtype], dims=list(t.dims),
                         allow_ragged_batch=bool(ragged and t.variable), optional=t.optional)


def _output(t: TensorSpec) -> mc.ModelOutput:
    return mc.ModelOutput(name=t.name, data_type=_DTYPE[t.dtype], dims=list(t.dims))


def stage_config(spec: StageSpec, variant: str = "cpu") -> mc.ModelConfig:
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    native = variant == "container"
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=SERVING.stage_max_batch[spec.name])
    if native:
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = "model.onnx"
    else:
        cfg.backend = STAGE_BACKEND
    # the native backend cannot take ragged inputs without batch_input plumbing: it batches
    # requests of equal list lengths only
    cfg.input.extend(_input(t, ragged=not native) for t in spec.inputs)
    cfg.output.extend(_output(t) for t in spec.outputs)
    kind = mc.ModelInstanceGroup.KIND_CPU if variant == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    count = SERVING.stage_instances[spec.name] if variant == "cpu" else 1
    cfg.instance_group.append(mc.ModelInstanceGroup(count=count, kind=kind))
    cfg.dynamic_batching.max_queue_delay_microseconds = SERVING.queue_delay_us
    cand = [t for t in spec.inputs if t.name == "candidates"]
    params = {"top_k": str(spec.top_k),
              "max_candidates": str(cand[0].max_len if cand else 0)}
    if not native:
        params.update({"onnx_file": "model.onnx", "device": "gpu" if variant == "gpu" else "cpu",
                       "ort_intra_op_threads": "1"})
    for k, v in sorted(params.items()):
        cfg.parameters[k].string_value = v
    return cfg


def estimator_config(variant: str = "cpu") -> mc.ModelConfig:
    """The effect-loss estimator: one onnxruntime call per dynamically formed batch."""
    native = variant == "container"
    cfg = mc.ModelConfig(name="estimator", max_batch_size=SERVING.estimator_max_batch)
    if native:
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = "model.onnx"
    else:
        cfg.backend = ESTIMATOR_BACKEND
    cfg.input.extend(_input(t, ragged=not native) for t in ESTIMATOR_INPUTS)
    cfg.output.extend(_output(t) for t in ESTIMATOR_OUTPUTS)
    kind = mc.ModelInstanceGroup.KIND_CPU if variant == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    cfg.instance_group.append(mc.ModelInstanceGroup(count=SERVING.estimator_instances, kind=kind))
    cfg.dynamic_batching.max_queue_delay_microseconds = SERVING.queue_delay_us
    cfg.version_policy.latest.num_versions = SERVING.rollout_versions
    if not native:
        params = {"onnx_file": "model.onnx", "device": "gpu" if variant == "gpu" else "cpu",
                  "ort_intra_op_threads": "1"}
        for k, v in sorted(params.items()):
            cfg.parameters[k].string_value = v
    return cfg


def router_config(variant: str = "cpu") -> mc.ModelConfig:
    """recycle_router: Python-backend BLS model on CPU in every variant (it does I/O and
    bookkeeping). With the CPU model set it runs the stages in its own process (`local_stages:
    all`; the Python-backend stages' inter-process hops cost more than the stages); in the GPU
    and container variants Triton serves the stages (GPU, onnxruntime backend) and the router
    calls them by BLS (`local_stages: none`). The estimator runs in the router's process in the
    CPU and GPU variants (`local_estimator: 1`): on an H200 its BLS call to the GPU estimator
    cost 6.9-12.7 ms per router batch against 1.1-1.5 ms on the router's CPU (docs/RESULTS.md,
    "recycle_router on a GPU"). The container variant keeps the BLS call (not measured there)."""
    cfg = mc.ModelConfig(name=ROUTER, backend=ROUTER_BACKEND, max_batch_size=SERVING.router_max_batch)
    cfg.input.extend(_input(t, ragged=True) for t in ROUTER_INPUTS)
    cfg.output.extend(_output(t) for t in ROUTER_OUTPUTS)
    cfg.instance_group.append(mc.ModelInstanceGroup(count=SERVING.router_instances[variant], kind=mc.ModelInstanceGroup.KIND_CPU))
    cfg.dynamic_batching.max_queue_delay_microseconds = SERVING.router_queue_delay_us
    cfg.version_policy.latest.num_versions = 1
    cpu = variant == "cpu"
    settings = RouterSettings(local_stages="all" if cpu else "none", local_estimator=int(variant in ("cpu", "gpu")))
    for k, v in sorted(settings.config_parameters().items()):  # never the password: environment only
        cfg.parameters[k].string_value = v
    return cfg


def ensemble_config(ens: EnsembleSpec, stages: dict[str, StageSpec]) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=ens.name, platform="ensemble",
                         max_batch_size=min(SERVING.stage_max_batch[s] for s in ens.stages))
    inputs = list(CONTEXT) + ([EXCLUDE_ITEMS] if ens.entry is None else
                              [TensorSpec(ens.entry.name, "int64", (-1,), ens.entry.doc)])
    cfg.input.extend(_input(t, ragged=False) for t in inputs)
    for s in ens.stages:
        cfg.output.extend([_output(items_out(s)), _output(scores_out(s))])
    prev = ens.entry.name if ens.entry is not None else None
    for s in ens.stages:
        step = cfg.ensemble_scheduling.step.add(model_name=s, model_version=-1)
        for t in stages[s].inputs:
            if t.name == "candidates":
                step.input_map[t.name] = prev
            else:
                step.input_map[t.name] = t.name
        for t in stages[s].outputs:
            step.output_map[t.name] = t.name
        prev = items_out(s).name
    return cfg


def all_configs(sizes: CascadeSizes, variant: str = "cpu") -> dict[str, mc.ModelConfig]:
    stages = stage_specs(sizes)
    cfgs = {s: stage_config(stages[s], variant) for s in STAGES}
    for name, ens in ensemble_specs().items():
        cfgs[name] = ensemble_config(ens, stages)
    cfgs["estimator"] = estimator_config(variant)
    cfgs[ROUTER] = router_config(variant)
    return cfgs


def config_text(cfg: mc.ModelConfig) -> str:
    return ("# Generated by build_models.py from comrecycle/specs.py - do not edit.\n"
            + text_format.MessageToString(cfg))


def write_configs(repo: str | Path, sizes: CascadeSizes, variant: str = "cpu") -> list[Path]:
    """Write config.pbtxt (+ empty version dirs) of every model. No model.py: the Python models
    name a Python-based backend (comrecycle.serving.backends) that holds it. Returns the written
    files (what the regeneration test compares)."""
    repo = Path(repo)
    written = []
    for name, cfg in all_configs(sizes, variant).items():
        d = repo / name
        (d / str(MODEL_VERSION)).mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(config_text(cfg))
        written.append(d / "config.pbtxt")
        if cfg.platform == "ensemble":
            keep = d / str(MODEL_VERSION) / ".gitkeep"
            keep.write_text("")
            written.append(keep)
    return written


def install_model_set(repo: str | Path, model_dir: str | Path, variant: str = "cpu") -> dict:
    """Copy a built model set's ONNX files into the repository's version dirs and write the
    repository manifest (versions, seed, git SHA, time)."""
    repo, model_dir = Path(repo), Path(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    sizes = CascadeSizes(**manifest["sizes"])
    write_configs(repo, sizes, variant)
    for s in STAGES:
        dst = repo / s / str(MODEL_VERSION)
        shutil.copyfile(model_dir / f"{s}.onnx", dst / "model.onnx")
        (dst / "manifest.json").write_text(json.dumps(
            {"stage": s, "version": MODEL_VERSION, "model_set": str(model_dir.resolve()),
             **{k: manifest[k] for k in ("profile", "seed", "git_sha", "built_at", "sizes")}}, indent=2))
    repo_manifest = {"variant": variant, "model_set": str(model_dir.resolve()),
                     "versions": {s: MODEL_VERSION for s in STAGES}, **{
                         k: manifest[k] for k in ("profile", "seed", "git_sha", "built_at", "sizes", "world")}}
    (repo / "manifest.json").write_text(json.dumps(repo_manifest, indent=2))
    return repo_manifest


def check_repository_configs(repo: str | Path) -> list[str]:
    """Structural checks of a generated repository (for variants that cannot be loaded here):
    every config parses, ensemble steps reference existing models and tensors, dtypes agree."""
    repo = Path(repo)
    problems, cfgs = [], {}
    for p in sorted(repo.glob("*/config.pbtxt")):
        cfg = mc.ModelConfig()
        try:
            text_format.Parse(p.read_text(), cfg)
        except text_format.ParseError as e:
            problems.append(f"{p}: {e}")
            continue
        if cfg.name != p.parent.name:
            problems.append(f"{p}: name {cfg.name!r} differs from its directory")
        cfgs[cfg.name] = cfg
    for name, cfg in cfgs.items():
        if cfg.platform != "ensemble":
            continue
        available = {i.name: i.data_type for i in cfg.input}
        for step in cfg.ensemble_scheduling.step:
            sub = cfgs.get(step.model_name)
            if sub is None:
                problems.append(f"{name}: step model {step.model_name!r} missing")
                continue
            if sub.max_batch_size < cfg.max_batch_size:
                problems.append(f"{name}: max_batch_size above {step.model_name}'s")
            sub_in = {i.name: i.data_type for i in sub.input}
            for k, v in step.input_map.items():
                if k not in sub_in:
                    problems.append(f"{name}: {step.model_name} has no input {k!r}")
                elif v not in available:
                    problems.append(f"{name}: tensor {v!r} not produced before {step.model_name}")
                elif available[v] != sub_in[k]:
                    problems.append(f"{name}: dtype mismatch for {k!r} of {step.model_name}")
            if set(sub_in) - set(step.input_map):
                problems.append(f"{name}: {step.model_name} inputs not mapped: {set(sub_in) - set(step.input_map)}")
            sub_out = {o.name: o.data_type for o in sub.output}
            for k, v in step.output_map.items():
                if k not in sub_out:
                    problems.append(f"{name}: {step.model_name} has no output {k!r}")
                else:
                    available[v] = sub_out[k]
        for o in cfg.output:
            if o.name not in available:
                problems.append(f"{name}: output {o.name!r} produced by no step")
    return problems


def install_estimator(repo: str | Path, estimator_dir: str | Path, version: int | None = None) -> Path:
    """Install a trained estimator (comrecycle train-estimator) as a new version of the served
    `estimator` model (version = highest existing + 1 unless given). Returns the version dir."""
    repo, estimator_dir = Path(repo), Path(estimator_dir)
    root = repo / "estimator"
    if not (root / "config.pbtxt").exists():
        raise FileNotFoundError(f"{root}/config.pbtxt missing: generate the repository first (build_models.py)")
    missing = [f for f in ("estimator.onnx", "manifest.json") if not (estimator_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{estimator_dir}: expected a trained estimator directory (`comrecycle "
                                f"train-estimator --out DIR` writes estimator.onnx and manifest.json); missing {missing}")
    existing = installed_versions(root, "model.onnx")
    version = version or (max(existing) + 1 if existing else 1)
    dst = root / str(version)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(estimator_dir / "estimator.onnx", dst / "model.onnx")
    manifest = json.loads((estimator_dir / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({"model": "estimator", "version": version,
                                                   "source": str(estimator_dir.resolve()), **manifest}, indent=2))
    return dst


def install_router_params(repo: str | Path, params_path: str | Path, estimator_version: int | None = None,
                          version: int | None = None) -> Path:
    """Install the params of `comrecycle solve` as a new version of recycle_router (version =
    highest existing + 1 unless given; the estimator version it calls = the latest installed
    unless given). Loading it with explicit model control swaps versions without downtime."""
    from .router.params import PARAMS_FILE, RouterParams, read_params_json

    repo = Path(repo)
    root = repo / ROUTER
    if not (root / "config.pbtxt").exists():
        raise FileNotFoundError(f"{root}/config.pbtxt missing: generate the repository first (build_models.py)")
    p = read_params_json(params_path)
    if estimator_version is None:
        est = installed_versions(repo / "estimator", "model.onnx")
        if not est:
            raise FileNotFoundError(f"{repo}/estimator has no installed version: install an estimator first")
        estimator_version = max(est)
    elif estimator_version not in installed_versions(repo / "estimator", "model.onnx"):
        raise FileNotFoundError(f"estimator version {estimator_version} is not installed in {repo}/estimator "
                                f"(installed: {installed_versions(repo / 'estimator', 'model.onnx')})")
    p["estimator_model_version"] = int(estimator_version)
    RouterParams.from_dict(p, str(params_path))  # fail here, not when Triton loads it
    existing = installed_versions(root, PARAMS_FILE)
    version = version or (max(existing) + 1 if existing else 1)
    dst = root / str(version)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / PARAMS_FILE).write_text(json.dumps(p, indent=2))
    return dst


def _version_ready(cfg: mc.ModelConfig, d: Path) -> bool:
    """A version dir that can load: its model.onnx (params.json for the router)."""
    need = "params.json" if cfg.name == ROUTER else "model.onnx"
    return d.is_dir() and d.name.isdigit() and (d / need).exists()


def load_plan(repo: str | Path) -> tuple[list[str], dict[str, str]]:
    """Which models of a repository can load, and why each other one cannot.

    Returns (loadable names sorted, {name: reason} for the rest). A model can load when a version
    dir holds its model.onnx (the router: params.json); an ensemble when all its steps can; the
    router when, besides, the estimator and every cascade suffix it calls can. The servers start
    with explicit model control on the loadable list, so a repository whose estimator is not
    trained yet still serves the cascade (and says why the router is missing)."""
    repo = Path(repo)
    cfgs = {}
    for p in sorted(repo.glob("*/config.pbtxt")):
        cfg = mc.ModelConfig()
        text_format.Parse(p.read_text(), cfg)
        cfgs[cfg.name] = cfg
    ok, why = set(), {}
    for n, c in cfgs.items():
        if c.platform == "ensemble" or n == ROUTER:
            continue
        if any(_version_ready(c, v) for v in (repo / n).iterdir()):
            ok.add(n)
        elif n == "estimator":
            why[n] = ("no version holds model.onnx: train one (`comrecycle train-estimator`) and install it "
                      "(`comrecycle install-estimator`)")
        else:
            why[n] = "no version holds model.onnx: build the model set (`comrecycle build-models`)"
    for n, c in cfgs.items():
        if c.platform == "ensemble":
            missing = [s.model_name for s in c.ensemble_scheduling.step if s.model_name not in ok]
            if missing:
                why[n] = f"its steps {missing} cannot load"
            else:
                ok.add(n)
    if ROUTER in cfgs:  # the router calls the estimator and every cascade suffix
        needs = {"estimator", "cascade", "cascade_from_prerank", "cascade_from_rank", "rerank"}
        if not any(_version_ready(cfgs[ROUTER], v) for v in (repo / ROUTER).iterdir()):
            why[ROUTER] = ("no version holds params.json: certify λ (`comrecycle solve`) and install the params "
                           "(`comrecycle install-params`)")
        elif not needs <= ok:
            why[ROUTER] = f"it calls {sorted(needs - ok)}, which cannot load"
        else:
            ok.add(ROUTER)
    return sorted(ok), why


def loadable_models(repo: str | Path) -> list[str]:
    """Models of a repository that can load (see load_plan for the reasons of the others)."""
    return load_plan(repo)[0]


def repository_server(repo: str | Path, **kwargs):
    """A TritonServer on `repo` with explicit model control, loading the loadable models."""
    from .serving.server import TritonServer

    models, skipped = load_plan(repo)
    if not models:
        raise FileNotFoundError(f"{repo}: no model can load (no model.onnx installed): run build_models.py")
    for name, reason in skipped.items():
        log.warning("not loading %s: %s", name, reason)
    return TritonServer(repo, model_control="explicit", load_models=models, **kwargs)

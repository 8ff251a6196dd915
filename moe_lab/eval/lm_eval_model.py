"""A moe_lab run as an lm-evaluation-harness model (lm_eval 0.4's TemplateLM API), and
`moe-lab eval --workdir RUN --lm-eval TASK[,TASK]`.

    loglikelihood          the harness's own context/continuation split (TemplateLM:
                           trailing context spaces move to the continuation, the
                           whole string is encoded once), scored in padded batches by
                           teacher forcing (harness.choice_logprobs), with is_greedy
    loglikelihood_rolling  lm_eval.utils' disjoint rolling windows of max_length
    generate_until         greedy KV-cache decoding (eval/generate.py), cut at the
                           first stop sequence; contexts keep their last
                           max_length - max_gen_toks tokens

The run's own tokenizer is used throughout, with no BOS added (what the HF backend
does for a tokenizer without a BOS post-processor); an empty context is the BOS token.
The sparsity paper (arXiv 2508.18672) scores GSM8K, TriviaQA and HellaSwag this way;
configs/lm_eval/ has offline task YAMLs reading local files in those formats.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import jax
from lm_eval.api.model import TemplateLM

from moe_lab.config.schema import ConfigError
from moe_lab.data.jsonl import iter_jsonl
from moe_lab.eval.evaluate import load_run, report
from moe_lab.eval.generate import generate_batched
from moe_lab.eval.harness import choice_logprobs
from moe_lab.parallel import sharding
from moe_lab.train.run_dir import eval_file


def tasks_dir() -> str:
    """The shipped offline tasks: configs/lm_eval/ of the source tree (a checkout or an
    editable install), else the copy a wheel installs as moe_lab.lm_eval_tasks (setup.py)."""
    source = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_eval")
    if os.path.isfile(os.path.join(source, "gsm8k_local.yaml")):
        return os.path.abspath(source)
    import importlib.util  # an installed wheel only

    spec = importlib.util.find_spec("moe_lab.lm_eval_tasks")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "eval --lm-eval: the shipped task YAMLs are missing (neither "
            "configs/lm_eval/ nor moe_lab.lm_eval_tasks; reinstall moe_lab)"
        )
    return list(spec.submodule_search_locations)[0]


class MoeLabLM(TemplateLM):
    """lm_eval model over run `workdir`'s checkpoint `step` (default: latest)."""

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        self.cfg, self.setup, self.state, self.step = load_run(workdir, step)
        self.workdir = workdir
        self.tok = self.setup.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.cfg.model.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def _model(self):
        return self.setup.graphdef, self.state["params"], self.state["model_state"]

    def _scope(self):
        return jax.set_mesh(self.setup.mesh), sharding.use_rules(self.cfg.mesh.rules, self.setup.mesh)

    # ------------------------------------------------------------ scoring

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy) per pair; longest first so each
        batch pads little (results come back in the given order)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list = [None] * len(pairs)
        mesh_scope, rules_scope = self._scope()
        with mesh_scope, rules_scope:
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                got = choice_logprobs(
                    *self._model(),
                    [pairs[i][0] for i in idx],
                    [pairs[i][1] for i in idx],
                    batch_size=self.batch_size,
                    max_len=self.max_length + 1,
                    with_greedy=True,
                )
                for i, (lp, greedy) in zip(idx, got, strict=True):
                    out[i] = (float(lp.sum()), bool(greedy.all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils  # lm_eval's window helpers

        windows, owner = [], []
        for k, req in enumerate(requests):
            for ctx, cont in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((list(ctx), list(cont)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._score(windows), strict=True):
            totals[k] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list = [None] * len(requests)
        groups: dict = {}  # max_gen_toks -> requests (one generation call each)
        for i, req in enumerate(requests):
            context, kw = req.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                raise ConfigError(
                    "lm-eval: moe_lab's harness model decodes greedily "
                    "(do_sample / temperature > 0 asked for)"
                )
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault(n, []).append((i, context, until))
        mesh_scope, rules_scope = self._scope()
        with mesh_scope, rules_scope:
            for n, items in groups.items():
                keep = max(1, self.max_length - n)
                prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for _, c, _ in items]
                gen = generate_batched(
                    *self._model(),
                    prompts,
                    n,
                    batch_size=min(self.batch_size, len(prompts)),
                    pad_id=self.tok.pad_id,
                    eos_id=self.tok.eos_id,
                )
                for (i, _, until), ids in zip(items, gen, strict=True):
                    text = self.tok_decode(ids)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
        return out


def task_manager(paths: list[str]):
    from lm_eval.tasks import TaskManager

    for p in paths:
        if not os.path.isdir(p):
            raise ConfigError(f"eval --include-path {p}: no such directory")
    # lm-eval's own ~10k task YAMLs read the HF Hub; indexing them took 17 s
    return TaskManager(include_path=paths, include_defaults=False)


def run_lm_eval(
    workdir: str,
    tasks: list[str],
    *,
    step: int | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    data: dict[str, str] | None = None,
    write: bool = True,
    print_table: bool = True,
) -> dict:
    """Scores the run with lm-eval on `tasks` (found offline: configs/lm_eval/ and
    include_path); writes DIR/eval/<step>-lm_eval.json."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import evaluator, utils  # the [eval] extra

    with tempfile.TemporaryDirectory() as tmp:
        shipped = local_task_copies(data or {}, tmp)
        manager = task_manager([shipped] + ([include_path] if include_path else []))
        for t in tasks:
            check_offline(manager, t)
        t0 = time.perf_counter()
        lm = MoeLabLM(workdir, step, batch_size=batch_size)
        res = evaluator.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
    result = {
        "workdir": os.path.abspath(workdir),
        "step": lm.step,
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "results": res["results"],
        "n_samples": res.get("n-samples", {}),
        "seconds": time.perf_counter() - t0,
        "table": utils.make_table(res),
    }
    return report(
        result,
        eval_file(workdir, f"{int(lm.step)}-lm_eval"),
        lambda r: r["table"],
        write=write,
        print_table=print_table,
    )


LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' file readers


def check_offline(manager, task: str) -> None:
    """A task lm-eval can run here: found, and reading local files only (nothing is
    downloaded at run time), each of which exists."""
    shipped = sorted(t for t in manager.all_tasks if t.endswith("_local"))
    entry = manager.task_index.get(task)
    if entry is None:
        raise ConfigError(
            f"eval --lm-eval: task {task!r} is not available offline (lm-eval's "
            f"built-in tasks read the HF Hub; shipped offline tasks: "
            f"{', '.join(shipped)}; more with --include-path DIR)"
        )
    cfg = getattr(entry, "cfg", None) or {}
    source = cfg.get("dataset_path")
    if source is None:  # a group or tag: its tasks are checked by lm-eval itself
        return
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if source not in LOCAL_BUILDERS and not os.path.isdir(source):
        raise ConfigError(
            f"eval --lm-eval: task {task!r} reads {source} from the HF Hub, which "
            f"is not available offline (shipped offline tasks: "
            f"{', '.join(shipped)})"
        )
    paths = files.values() if isinstance(files, dict) else [files] if files else []
    for path in (q for p in paths for q in ([p] if isinstance(p, str) else p)):
        if not os.path.isfile(path):
            raise ConfigError(
                f"eval --lm-eval: task {task!r} reads {path}, which does not exist"
                f" (give --lm-eval-data {task}=FILE)"
            )
        if source == "json" and path.endswith((".jsonl", ".json")):
            # read here first: a bad row is named (file:line), not a datasets traceback
            for lineno, row in iter_jsonl(path, f"eval --lm-eval: task {task!r} reads"):
                if not isinstance(row, dict):
                    raise ConfigError(
                        f"eval --lm-eval: task {task!r} reads {path}:{lineno}: a row must be a JSON object"
                    )


def local_task_copies(data: dict[str, str], tmp: str) -> str:
    """The shipped task directory; with --lm-eval-data TASK=FILE, a copy of it in tmp
    whose TASK.yaml reads FILE instead of its default data/lm_eval/<name>.jsonl."""
    if not data:
        return tasks_dir()
    shutil.copytree(tasks_dir(), tmp, dirs_exist_ok=True)
    for task, path in data.items():
        dst = os.path.join(tmp, f"{task}.yaml")
        if not os.path.isfile(dst):
            raise ConfigError(
                f"eval --lm-eval-data {task}=...: no shipped task {task} (configs/lm_eval/{task}.yaml)"
            )
        if not os.path.isfile(path):
            raise ConfigError(f"eval --lm-eval-data {task}={path}: no such file")
        with open(dst) as f:
            text = f.read()
        default = f"data/lm_eval/{task.removesuffix('_local')}.jsonl"
        if default not in text:
            raise AssertionError(f"configs/lm_eval/{task}.yaml does not read {default}")
        with open(dst, "w") as f:
            f.write(text.replace(default, os.path.abspath(path)))
    return tmp

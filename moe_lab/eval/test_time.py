"""Test-time compute: coverage@k and majority@k from n samples, budget forcing
(s1, arXiv 2501.19393), and accuracy / log-likelihood vs the recursion depth
allowed at inference (MoR, arXiv 2507.10524 sec. 4).

Estimators (computed from ONE set of n samples per prompt, then averaged over prompts):

    coverage@k   P(at least one of k samples is correct), k drawn without
                 replacement from the n: the unbiased estimator of Chen et al.
                 2021 (HumanEval, eq. 1), 1 - C(n-c, k) / C(n, k) with c the
                 number of correct samples, in its stable product form.
    majority@k   the EXACT expectation, over all C(n, k) subsets of size k, of
                 "the most frequent answer of the subset is correct", ties
                 broken uniformly at random (a tie of t answers that includes
                 the correct one counts 1/t).  Computed by a dynamic program
                 over answer classes (`majority_at_k`), no bootstrap; tested
                 against brute-force enumeration.  Answers are grouped by a
                 vote key: the extracted answer (`extract_answer`), or
                 `task.vote_key(prediction, example)` where a task defines it
                 (countdown: the value of a legal expression).

Budget forcing (s1 sec. 3.1), a token-level controller around the KV-cache
decoder (`budget_force`); every row emits exactly one token per step (sampled
or forced), so all rows keep writing the same cache slot:

    max budget   when a row has written `max_think` thinking tokens without
                 closing its working, "</think><answer>" is forced and the
                 answer is generated.
    min budget / extrapolation   when a row tries to end its thinking
                 ("</think>", "<answer>" or EOS) before `min_think` tokens or
                 before it has been pushed `num_waits` times, the end token is
                 suppressed and " Wait" is appended instead (s1: N = 2, 4, 6).

Metrics over a set A of budgets with accuracy f(a) (REFERENCES.md sec. 4):
Control = share of runs whose thinking length stays within the budget;
Scaling = mean over pairs a < b of (f(b) - f(a)) / (b - a); Performance =
max_a f(a) (`budget_metrics`).

`evaluate_ttc(workdir)` / `moe-lab eval --ttc` runs all of it on a checkpoint
and writes DIR/eval/<step>-ttc.json; `sweep_stage` is the sweep post stage
(`{"kind": "moe_lab.eval.test_time:sweep_stage", ...}`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from moe_lab.config.load import ttc_config_from
from moe_lab.config.schema import ConfigError, TTCConfig, parse_mixture
from moe_lab.config.validate import validate_ttc
from moe_lab.data import pipeline
from moe_lab.data.tasks.base import extract_answer
from moe_lab.data.tasks.registry import make_task
from moe_lab.data.tokenizer import THINK_START, Tokenizer, load_tokenizer
from moe_lab.eval.budget_forcing import Forcing, forcing_tokens, run_forcing
from moe_lab.eval.evaluate import load_run, report, task_losses
from moe_lab.eval.generate import generate_batched, generation_budget
from moe_lab.growth.transforms import with_recursions
from moe_lab.parallel import sharding
from moe_lab.train.run_dir import eval_file
from moe_lab.train.state import setup_on_devices

# --------------------------------------------------------------- estimators


def coverage_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_at_k(keys: Sequence, correct: Sequence[bool], k: int) -> float:
    """E over k-subsets of the n samples of [majority answer is correct] (ties: 1/t).

    keys[i] is sample i's vote key, correct[i] whether it is right; samples that
    share a key must share correctness.  Dynamic program: fix j = how many copies
    of the correct answer the subset holds; count the ways to pick the other k-j
    samples with every other answer appearing <= j times, split by the number t of
    answers that tie at exactly j (credit 1/(t+1)).
    """
    n = len(keys)
    if len(correct) != n:
        raise ValueError(f"{n} keys but {len(correct)} correctness flags")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n={n}, got k={k}")
    right = {kk for kk, c in zip(keys, correct) if c}
    wrong = {kk for kk, c in zip(keys, correct) if not c}
    if right & wrong:
        raise ValueError(f"vote keys {sorted(map(str, right & wrong))[:3]} are both right and wrong")
    if not right:
        return 0.0
    counts = Counter(keys)
    # several distinct right keys (possible for verifier tasks): each is its own class
    total = 0.0
    for rk in right:
        m_c = counts[rk]
        others = [m for kk, m in counts.items() if kk != rk]
        for j in range(1, min(k, m_c) + 1):
            rest = k - j
            # dp[s, t]: ways to choose s samples from the classes seen so far, each
            # class <= j copies, t of them exactly j (floats: C(256,128) ~ 6e75 fits)
            dp = np.zeros((rest + 1, len(others) + 1))
            dp[0, 0] = 1.0
            for m in others:
                new = np.zeros_like(dp)
                for x in range(min(m, j, rest) + 1):
                    w = math.comb(m, x)
                    tie = 1 if x == j else 0
                    new[x:, tie:] += w * dp[: rest + 1 - x, : dp.shape[1] - tie]
                dp = new
            credit = np.sum(dp[rest] / (np.arange(dp.shape[1]) + 1.0))
            total += math.comb(m_c, j) * credit
    return float(total / math.comb(n, k))


def majority_bruteforce(keys: Sequence, correct: Sequence[bool], k: int) -> float:
    """Reference for `majority_at_k`: enumerate every k-subset (small n only)."""
    right = {kk for kk, c in zip(keys, correct) if c}
    acc, num = 0.0, 0
    for subset in itertools.combinations(range(len(keys)), k):
        cnt = Counter(keys[i] for i in subset)
        top = max(cnt.values())
        tied = [kk for kk, v in cnt.items() if v == top]
        acc += sum(kk in right for kk in tied) / len(tied)
        num += 1
    return acc / num


def coverage_bruteforce(correct: Sequence[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def default_ks(n: int, max_k: int | None = None) -> list[int]:
    """1, 2, 4, ... up to min(n, max_k)."""
    top = min(n, max_k or n)
    return [2**i for i in range(int(math.log2(top)) + 1)]


def ttc_curves(keys_PN: Sequence[Sequence], correct_PN: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict:
    """Mean over prompts of coverage@k and majority@k: {"coverage": {k: v}, "majority": ...}."""
    cov = {k: float(np.mean([coverage_at_k(len(c), int(sum(c)), k) for c in correct_PN])) for k in ks}
    maj = {
        k: float(np.mean([majority_at_k(list(kk), list(c), k) for kk, c in zip(keys_PN, correct_PN)]))
        for k in ks
    }
    return {"coverage": cov, "majority": maj}


def budget_metrics(
    budgets: Sequence[float], accuracy: Sequence[float], within: Sequence[Sequence[bool]] | Sequence[float]
) -> dict:
    """s1's Control / Scaling / Performance over a budget set A (REFERENCES.md sec. 4).

    budgets: the a in A; accuracy: f(a); within: per budget, the flags "this run's
    thinking stayed within a" (or the share directly).  Control pools all runs.
    Scaling = mean over pairs a<b of (f(b)-f(a))/(b-a), in units of f per budget unit.
    """
    if len(budgets) != len(accuracy) or len(budgets) != len(within):
        raise ValueError("budgets, accuracy and within must have the same length")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets must be distinct, got {list(budgets)}")
    flags = []
    for w in within:
        flags.extend([bool(x) for x in w] if np.ndim(w) else [float(w)])
    control = float(np.mean(flags)) if flags else float("nan")
    pts = sorted(zip(budgets, accuracy))
    slopes = [(fb - fa) / (b - a) for (a, fa), (b, fb) in itertools.combinations(pts, 2)]
    scaling = float(np.mean(slopes)) if slopes else float("nan")
    return {"control": control, "scaling": scaling, "performance": float(max(accuracy))}


# ------------------------------------------------------------------ sampling


def sample_batched(
    graphdef,
    params,
    model_state,
    prompts: list[list[int]],
    n: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    pad_id: int = 0,
    eos_id: int | None = None,
) -> list[list[list[int]]]:
    """n samples per prompt from the KV-cache decoder: out[p][i] = tokens (cut at EOS).

    Rows are prompt-major (each prompt repeated n times) in fixed-shape batches;
    batch b uses key fold_in(key(seed), b), so a call is a pure function of seed
    (generate_batched).
    """
    rows = [p for p in prompts for _ in range(n)]
    flat = generate_batched(
        graphdef,
        params,
        model_state,
        rows,
        max_new_tokens,
        batch_size=min(batch_size, len(rows)),
        pad_id=pad_id,
        eos_id=eos_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def vote_key(task, prediction: str, example) -> str:
    """The answer a sample votes for: task.vote_key if defined, else the extracted answer."""
    fn = getattr(task, "vote_key", None)
    if fn is not None:
        return fn(prediction, example)
    return extract_answer(prediction)


# ------------------------------------------------------- recursion depth (MoR)


def depth_sweep(
    cfg,
    state: dict,
    task_name: str,
    examples,
    depths: Sequence[int],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    num_loss_batches: int = 2,
    tok: Tokenizer | None = None,
) -> list[dict]:
    """Per depth (on one device): greedy accuracy on `examples`, eval loss and answer NLL
    of the task; `tok`: the run's tokenizer (default: cfg.data.tokenizer's)."""
    task = make_task(task_name, cfg.data)
    tok = tok or load_tokenizer(cfg.data.tokenizer)
    prompts = [tok.encode(ex.prompt, add_bos=True) for ex in examples]
    out = []
    for d in depths:
        cfg2, params, ms = with_recursions(cfg, state, d)
        cfg2, setup = setup_on_devices(cfg2, "one", tok)
        params = jax.device_put(params, setup.shardings["params"])
        with jax.set_mesh(setup.mesh), sharding.use_rules(cfg2.mesh.rules, setup.mesh):
            batches = pipeline.make_eval_batches(task, cfg2.data, batch_size, num_loss_batches, tokenizer=tok)
            losses = task_losses(setup, {"params": params, "model_state": ms}, batches, [task_name])
            generated = generate_batched(
                setup.graphdef,
                params,
                ms,
                prompts,
                max_new_tokens,
                batch_size=min(batch_size, len(prompts)),
                pad_id=tok.pad_id,
                eos_id=tok.eos_id,
            )
        correct = [task.check(tok.decode(g), ex) for g, ex in zip(generated, examples)]
        bits = losses.get(f"eval/{task_name}/task_loss_bits")
        out.append(
            {
                "depth": int(d),
                "trained_depth": cfg.model.mor.num_recursions,
                "accuracy": float(np.mean(correct)),
                "eval_loss": losses.get(f"eval/{task_name}/loss"),
                "task_loss_bits": bits,
                "answer_loglik_nats": None if bits is None else -bits * math.log(2),
            }
        )
    return out


# ----------------------------------------------------------------- evaluate


def _pick_task(cfg, name: str) -> str:
    names = [n for n, _ in parse_mixture(cfg.data.mixture)]
    if name:
        return name
    for cand in ("arith", "countdown"):
        if cand in names:
            return cand
    task = next((n for n in names if n not in ("file", "corpus")), None)
    if task is None:
        raise ConfigError(
            "ttc: the run's mixture has no task with answers; pass --task (arith, countdown, facts)"
        )
    return task


def evaluate_ttc(
    workdir: str,
    step: int | None = None,
    *,
    ttc: TTCConfig | None = None,
    write: bool = True,
    print_table: bool = True,
) -> dict:
    """Coverage/majority curves, budget-forcing tables and (MoR) the depth sweep of a
    checkpoint; writes DIR/eval/<step>-ttc.json."""
    t = validate_ttc(ttc or TTCConfig())
    t0 = time.perf_counter()
    cfg, setup, state, step = load_run(workdir, step, devices="one")
    name = _pick_task(cfg, t.task)
    task = make_task(name, cfg.data)
    examples = [ex for ex in pipeline.eval_prompts(task, min(t.num_prompts, task.num_eval)) if ex.answer]
    if not examples:
        raise ConfigError(f"ttc: task {name!r} has no eval examples with answers")
    tok = setup.tokenizer
    budget = t.max_new_tokens or generation_budget(examples, cfg.eval.max_new_tokens, tok)
    ks = default_ks(t.n, t.max_k or None)
    gd, params, ms = setup.graphdef, state["params"], state["model_state"]
    prompts = [tok.encode(ex.prompt, add_bos=True) for ex in examples]
    result = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "task": name,
        "num_prompts": len(examples),
        "n": t.n,
        "ks": ks,
        "ttc_config": dataclasses.asdict(t),
        "max_new_tokens": budget,
    }
    with jax.set_mesh(setup.mesh), sharding.use_rules(cfg.mesh.rules, setup.mesh):
        greedy = generate_batched(
            gd,
            params,
            ms,
            prompts,
            budget,
            batch_size=min(t.batch_size, len(prompts)),
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
        )
        result["greedy_accuracy"] = float(
            np.mean([task.check(tok.decode(g), ex) for g, ex in zip(greedy, examples)])
        )
        samples = sample_batched(
            gd,
            params,
            ms,
            prompts,
            t.n,
            budget,
            temperature=t.temperature,
            top_p=t.top_p,
            seed=t.seed,
            batch_size=t.batch_size,
            pad_id=tok.pad_id,
            eos_id=tok.eos_id,
        )
        keys, correct = [], []
        for ex, outs in zip(examples, samples):
            texts = [tok.decode(o) for o in outs]
            correct.append([bool(task.check(x, ex)) for x in texts])
            keys.append([vote_key(task, x, ex) for x in texts])
        curves = ttc_curves(keys, correct, ks)
        result["coverage"] = {str(k): v for k, v in curves["coverage"].items()}
        result["majority"] = {str(k): v for k, v in curves["majority"].items()}
        result["sample_accuracy"] = float(np.mean(correct))
        if examples[0].working.startswith(THINK_START):
            result["budget_forcing"] = _forcing_tables(gd, params, ms, task, examples, t, tok)
    if cfg.model.stack == "recursive" and cfg.model.mor.routing != "token_choice":
        depths = t.depths or tuple(range(1, cfg.model.mor.num_recursions + 3))
        result["recursion_depth"] = depth_sweep(
            cfg,
            state,
            name,
            examples,
            depths,
            max_new_tokens=budget,
            batch_size=min(t.batch_size, 32),
            tok=tok,
        )
    result["seconds"] = time.perf_counter() - t0
    return report(result, ttc_path(workdir, step), format_ttc, write=write, print_table=print_table)


def _forcing_tables(gd, params, ms, task, examples, t: TTCConfig, tok: Tokenizer) -> dict:
    bs = min(t.batch_size, len(examples))
    settings = [Forcing(max_think=max(t.budgets + (t.wait_cap,)), num_waits=max(t.waits + (0,)))]
    L = max(forcing_tokens(f, tok) for f in settings)
    free = run_forcing(
        gd,
        params,
        ms,
        task,
        examples,
        Forcing(max_think=t.wait_cap),
        tok=tok,
        batch_size=bs,
        seed=t.seed,
        max_new=L,
    )
    rows_max = []
    for a in t.budgets:
        r = run_forcing(
            gd,
            params,
            ms,
            task,
            examples,
            Forcing(max_think=int(a)),
            tok=tok,
            batch_size=bs,
            seed=t.seed,
            max_new=L,
        )
        # the unforced run of the same prompts judged against budget a (s1's baseline)
        r["unforced_control"] = float(np.mean([x <= a for x in free["think_lens"]]))
        rows_max.append({"budget": int(a), **_public(r)})
    m_max = budget_metrics(
        [r["budget"] for r in rows_max], [r["accuracy"] for r in rows_max], [r["control"] for r in rows_max]
    )
    rows_wait = []
    for n in t.waits:
        r = run_forcing(
            gd,
            params,
            ms,
            task,
            examples,
            Forcing(max_think=t.wait_cap, num_waits=int(n)),
            tok=tok,
            batch_size=bs,
            seed=t.seed,
            max_new=L,
        )
        rows_wait.append({"waits": int(n), **_public(r)})
    m_wait = budget_metrics(
        [r["waits"] for r in rows_wait], [r["accuracy"] for r in rows_wait], [r["control"] for r in rows_wait]
    )
    return {
        "max_budget": {"rows": rows_max, "metrics": m_max},
        "extrapolation": {"rows": rows_wait, "metrics": m_wait, "think_cap": t.wait_cap},
        "unforced": _public(free),
    }


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("within", "think_lens")}


def ttc_path(workdir: str, step: int) -> str:
    return eval_file(workdir, f"{int(step)}-ttc")


def format_ttc(r: dict) -> str:
    lines = [
        f"test-time compute @ step {r['step']}  task {r['task']}  "
        f"({r['num_prompts']} prompts x n={r['n']}, greedy acc {r['greedy_accuracy']:.3f})",
        f"{'k':>5} {'coverage@k':>11} {'majority@k':>11}",
    ]
    for k in r["ks"]:
        lines.append(f"{k:>5} {r['coverage'][str(k)]:>11.3f} {r['majority'][str(k)]:>11.3f}")
    bf = r.get("budget_forcing")
    if bf:
        lines.append("budget forcing (max thinking tokens; s1):")
        lines.append(f"{'budget':>7} {'accuracy':>9} {'control':>8} {'think':>7} {'forced':>7}")
        for row in bf["max_budget"]["rows"]:
            lines.append(
                f"{row['budget']:>7} {row['accuracy']:>9.3f} {row['control']:>8.3f} "
                f"{row['mean_think']:>7.1f} {row['forced_end']:>7.2f}"
            )
        lines.append(_metrics_line(bf["max_budget"]["metrics"], "per thinking token"))
        lines.append(
            f"extrapolation (suppress end of thinking, append 'Wait' N times; "
            f"cap {bf['extrapolation']['think_cap']}):"
        )
        lines.append(f"{'N':>7} {'accuracy':>9} {'control':>8} {'think':>7} {'waits':>7}")
        for row in bf["extrapolation"]["rows"]:
            lines.append(
                f"{row['waits']:>7} {row['accuracy']:>9.3f} {row['control']:>8.3f} "
                f"{row['mean_think']:>7.1f} {row['mean_waits']:>7.2f}"
            )
        lines.append(_metrics_line(bf["extrapolation"]["metrics"], "per Wait"))
    for row in r.get("recursion_depth", []):
        lines.append(
            f"depth {row['depth']} (trained {row['trained_depth']}): accuracy "
            f"{row['accuracy']:.3f}  answer loglik {row['answer_loglik_nats']:.4f} "
            f"nats/token  eval loss {row['eval_loss']:.4f}"
        )
    return "\n".join(lines)


def _metrics_line(m: dict, unit: str) -> str:
    return (
        f"  Control {100 * m['control']:.1f}%  Scaling {100 * m['scaling']:.3f} "
        f"points {unit}  Performance {100 * m['performance']:.1f}%"
    )


def sweep_columns(r: dict) -> dict:
    """results.jsonl columns of a ttc result."""
    cols = {"ttc_task": r["task"], "ttc_n": r["n"], "greedy_accuracy": r["greedy_accuracy"]}
    cols.update({f"coverage@{k}": v for k, v in r["coverage"].items()})
    cols.update({f"majority@{k}": v for k, v in r["majority"].items()})
    bf = r.get("budget_forcing")
    if bf:
        for which in ("max_budget", "extrapolation"):
            for k, v in bf[which]["metrics"].items():
                cols[f"bf_{which}_{k}"] = v
    for row in r.get("recursion_depth", []):
        cols[f"depth{row['depth']}_accuracy"] = row["accuracy"]
        cols[f"depth{row['depth']}_answer_loglik"] = row["answer_loglik_nats"]
    return cols


def sweep_stage(run_dir: str, spec: dict) -> dict:
    """Sweep post stage: {"kind": "moe_lab.eval.test_time:sweep_stage", "n": 16, ...}
    (keys of TTCConfig) -> coverage@k, majority@k, budget-forcing metrics columns."""
    r = evaluate_ttc(run_dir, spec.get("step"), ttc=ttc_config_from(spec))
    return sweep_columns(r)

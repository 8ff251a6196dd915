"""GRPO post-training (moe-lab rl; moe_lab/rl/grpo.py).

    moe-lab rl --from runs/tiny --to runs/tiny_grpo --config configs/grpo.py
    moe-lab rl --from runs/tiny --to runs/tiny_cd --config configs/grpo.py:countdown
    moe-lab rl ... --config configs/grpo.py:cpu     # tiny CPU models: larger LR, fewer steps
    moe-lab rl ... --config configs/grpo.py:strategies  # the configs/arith_strategies.py base

Defaults follow 2508.18672's recipe: n = 5 rollouts per prompt, LR 5e-6, KL
coefficient 1e-3 (k3 estimator), group-normalised advantages, exact-match reward,
clipped ratio with eps = 0.2 (DeepSeekMath).
"""


def get_config(arg=None):
    c = dict(
        task="arith",
        steps=200,
        prompts_per_step=8,
        num_rollouts=5,
        temperature=1.0,
        top_p=1.0,
        lr=5e-6,
        clip_eps=0.2,
        kl_coef=1e-3,
        kl_estimator="k3",
        format_reward=0.0,
        loss_agg="sequence",
        scale_rewards=True,
        updates_per_batch=1,
        eval_every=25,
        eval_examples=64,
        checkpoint_every=25,
        seed=0,
    )
    if arg in (None, ""):
        return c
    if arg == "countdown":
        c.update(task="countdown", format_reward=0.1)
        return c
    if arg == "cpu":  # tiny CPU models (experiments/grpo_arith): 5e-6 moves nothing in
        # a few hundred steps; 1e-3 collapsed (KL > 5, empty answers); 3e-4 is stable
        c.update(steps=250, lr=3e-4, prompts_per_step=16, eval_every=50, checkpoint_every=50, devices="one")
        return c
    if arg == "strategies":  # configs/arith_strategies.py's base (experiments/grpo_arith)
        c.update(
            steps=200,
            lr=3e-4,
            prompts_per_step=16,
            eval_every=25,
            eval_examples=256,
            checkpoint_every=50,
            devices="one",
        )
        return c
    raise ValueError(f"unknown arg {arg!r} (use countdown, cpu or strategies)")

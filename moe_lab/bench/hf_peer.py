"""The peer in `bench moe`: HF transformers' `MixtralSparseMoeBlock` on PyTorch CPU.

What a researcher would otherwise run on a laptop: the same shape as moe_lab's layer
(tokens, d_model, expert hidden, top-k, f32), forward + backward of sum(y) with
respect to the input and every parameter, on as many torch threads as XLA:CPU uses
(the cores this process may run on).  HF's block is dropless (a python loop over the
experts that received tokens: index, three matmuls, `index_add_`) and computes no
aux loss (the model adds it from the router logits), so moe_lab's layer does a little
more work per call (balance, z-loss and entropy terms, load statistics).

Imported only where transformers is installed (the `dev` / `hf` extras).
"""

from __future__ import annotations

from moe_lab.bench.common import host_cores


def available() -> str | None:
    """None if the peer can run here, else why not (one line)."""
    try:
        import torch  # noqa: F401
        from transformers.models.mixtral import modeling_mixtral  # noqa: F401
    except ImportError as e:
        return f"HF peer not timed: {e.name or 'transformers'} is not installed (pip install -e '.[hf]')"
    return None


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def mixtral_block_fn(tokens: int, d_model: int, hidden: int, experts: int, top_k: int, seed: int = 0):
    """(fn, args) for `paired_ratios` / `time_fn`: fn(x) runs HF's block forward and
    backward once (synchronous on CPU) and returns the output's sum, a python float."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.set_num_threads(host_cores())
    torch.manual_seed(seed)
    config = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=hidden,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(config).float().train()
    for p in block.parameters():  # moe_lab's init scale (not that it changes the cost)
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, d_model, requires_grad=True)

    def step(x):
        block.zero_grad(set_to_none=True)
        x.grad = None
        y, _router_logits = block(x)
        loss = y.sum()
        loss.backward()
        return float(loss.detach())

    return step, (x,)

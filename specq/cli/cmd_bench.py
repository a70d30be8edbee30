"""`specq bench [MODEL]`: tokens/s of every decoding strategy against HF's baselines, same prompt.

Thin: loads the model, transforms it for the modes the rows need, and calls
`specq.runtime.bench.run_rows`; prints the table (or `--json`).
"""

from __future__ import annotations

import json

import click


@click.command("bench")
@click.argument("model", required=False)
@click.option("--rows", default="hf_eager,hf_static_compile,ar_bf16,ar_mxfp4,ar_w4a16,ngram_bf16,mlspecqd2,mlspecqd3,qspec",
              show_default=True, help="Comma-separated rows; a specq row may end in @inductor or @none.")
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=256, show_default=True)
@click.option("--gamma", type=int, default=4, show_default=True, help="Draft tokens per round (2-level rows).")
@click.option("--gamma3", default="4,4", show_default=True, help="Gammas of the 3-level row (ngram, mxfp4).")
@click.option("--gamma-ngram", type=int, default=8, show_default=True, help="Gamma of ngram -> bf16.")
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--compile", "compile_", default="auto", show_default=True,
              help="How specq steps are compiled: auto (inductor on CUDA, eager on CPU), inductor, none. "
                   "On the CPU, inductor uses the frozen-weight CPU recipe (specq/runtime/compiled_cpu.py): "
                   "~2x eager, but ~30-50 s of compile per graph (one per mode and query length), not "
                   "counted in tok/s (reported as 'first call s').")
@click.option("--strict", is_flag=True, help="Fail unless lossless rows give their target's tokens (use float32).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(model, rows, prompt_len, new_tokens, gamma, gamma3, gamma_ngram, device, dtype, compile_, strict, as_json):
    """Tokens/s of every strategy against HF generate (eager and static-cache compiled), same tokens.

    Batch 1, greedy, EOS ignored so that every row makes exactly --new-tokens tokens.
    """
    import torch

    import specq
    from specq.runtime import bench as B

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    row_list = [r.strip() for r in rows.split(",") if r.strip()]
    bad = [r for r in row_list if r.partition("@")[0] not in B.ROWS]
    if bad:
        raise click.BadParameter(f"unknown rows {bad}; rows are {', '.join(B.ROWS)}", param_hint="--rows")
    try:
        g3 = [int(x) for x in gamma3.split(",")]
    except ValueError:
        raise click.BadParameter("--gamma3 takes two integers, e.g. 4,4", param_hint="--gamma3") from None
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise click.BadParameter(f"unknown dtype {dtype!r} (e.g. bfloat16, float32)", param_hint="--dtype")
    mdl, tok = specq.load(model, dtype=getattr(torch, dtype), device=device)
    modes = sorted({m for r in row_list for m in B.NEEDED_MODES.get(r.partition("@")[0], ())} | {"bf16"},
                   key=["bf16", "mxfp4", "w4a16", "w4a4"].index)
    if modes != ["bf16"]:
        specq.transform(mdl, modes=tuple(modes))
    ids = B.make_prompt(mdl, tok, prompt_len)
    gammas = {"mlspecqd2": gamma, "qspec": gamma, "mlspecqd3": g3, "ngram_bf16": gamma_ngram}
    log = (lambda *a: None) if as_json else (lambda *a: click.echo(" ".join(str(x) for x in a), err=True))
    failed = None
    try:
        results = B.run_rows(mdl, ids, new_tokens, rows=row_list, gamma=gammas,
                             compile=None if compile_ == "none" else compile_, strict=strict, log=log)
    except B.LosslessError as e:
        failed, results = e, e.rows
    if as_json:
        click.echo(json.dumps(dict(device=device, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens,
                                   rows=[r.as_dict() for r in results]), indent=1, default=str))
    else:
        click.echo(B.markdown_table(results))
    if failed is not None:
        raise click.ClickException(str(failed))

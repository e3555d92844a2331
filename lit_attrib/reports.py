"""Self-contained HTML reports (no scripts from the network, so they open offline)."""

from __future__ import annotations

import html

import torch
from matplotlib import colormaps
from matplotlib.colors import to_hex

__all__ = ["token_scores_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .4em 0 .6em; border-bottom: 1px solid #ddd; }
.legend { display: inline-block; width: 240px; height: 12px; vertical-align: middle; margin: 0 .5em;
          background: linear-gradient(to right, %(gradient)s); border: 1px solid #aaa; }
.q { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; margin: .25em 0;
     padding: .2em .4em; border-bottom: 1px solid #f0f0f0; white-space: pre-wrap; }
.q .id { color: #888; display: inline-block; min-width: 6em; }
.q .max { color: #888; float: right; }
.t { border-radius: 2px; padding: 1px 0; }
.t.off { color: #999; }
button { margin-left: .4em; }
"""

_SCRIPT = """
function sortBy(key) {
  const box = document.getElementById('queries');
  const rows = Array.from(box.children);
  rows.sort((a, b) => key === 'index' ? a.dataset.index - b.dataset.index : b.dataset[key] - a.dataset[key]);
  rows.forEach(r => box.appendChild(r));
}
"""


def token_scores_html(tokens: list[list[str]], scores: torch.Tensor, mask: torch.Tensor, indices: list[int],
                      title: str = "token scores", colormap: str = "coolwarm") -> str:
    """One line per query, each token coloured by its score on a diverging scale shared by all queries.

    The scale runs from ``-s`` (blue) to ``+s`` (red) with ``s`` the 99th percentile of ``|score|``
    over scored tokens, so one outlier does not wash out the rest; hovering a token shows its exact
    score. Tokens without a score (prompt, padding) are grey. Rows can be re-sorted by index, by their
    highest score or by their summed score.

    Args:
        tokens: each query's token strings (``""`` past its end).
        scores: ``(N, T)`` scores.
        mask: ``(N, T)`` bool, where a token has a score.
        indices: each query's dataset index.
        title: page heading.
        colormap: a diverging matplotlib colour map.
    """
    scored = scores[mask].abs().double()
    # kthvalue, not quantile: quantile refuses more than 2**24 values.
    scale = float(torch.kthvalue(scored, max(1, round(0.99 * scored.numel()))).values) if scored.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    cmap = colormaps[colormap]
    gradient = ", ".join(to_hex(cmap(x / 8)) for x in range(9))
    lines = []
    for row, (words, values, keep, index) in enumerate(zip(tokens, scores.tolist(), mask.tolist(), indices)):
        spans = []
        for word, value, has_score in zip(words, values, keep):
            if not word:
                continue
            text = html.escape(word)
            if has_score:
                colour = to_hex(cmap(0.5 + 0.5 * max(-1.0, min(1.0, value / scale))))
                spans.append(f'<span class="t" style="background:{colour}" title="{value:.6g}">{text}</span>')
            else:
                spans.append(f'<span class="t off" title="no loss">{text}</span>')
        row_scores = [v for v, k in zip(values, keep) if k]
        highest = max(row_scores, default=0.0)
        total = sum(row_scores)
        lines.append(f'<div class="q" data-index="{index}" data-max="{highest:.6g}" data-sum="{total:.6g}">'
                     f'<span class="id">#{index}</span>{"".join(spans)}'
                     f'<span class="max">max {highest:.3g} · sum {total:.3g}</span></div>')
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE % {'gradient': gradient}}</style>"
        f"<script>{_SCRIPT}</script></head><body><header><b>{html.escape(title)}</b> · {len(lines)} queries<br>"
        f"<small>{-scale:.3g}<span class='legend'></span>{scale:.3g} (99th percentile of |score|; hover a token "
        "for its value; grey tokens carry no loss)</small> sort by"
        "<button onclick=\"sortBy('index')\">index</button><button onclick=\"sortBy('max')\">max score</button>"
        "<button onclick=\"sortBy('sum')\">summed score</button></header>"
        f"<div id='queries'>{''.join(lines)}</div></body></html>"
    )

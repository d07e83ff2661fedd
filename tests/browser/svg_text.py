"""Overlapping text in rendered plotly charts, from the SVG bounding boxes the browser computed."""

from __future__ import annotations

from playwright.sync_api import Page

#: Every visible text box of every plotly chart on the page: [{chart, text, x, y, w, h}].
_BOXES_JS = """
() => {
  const out = [];
  document.querySelectorAll('[data-testid="stPlotlyChart"]').forEach((chart, c) => {
    chart.querySelectorAll('svg.main-svg text').forEach(t => {
      const text = (t.textContent || '').trim();
      if (!text) return;
      if (t.closest('.hoverlayer') || t.closest('.modebar')) return;
      const style = window.getComputedStyle(t);
      if (style.display === 'none' || style.visibility === 'hidden' || style.opacity === '0') return;
      let hidden = false;
      for (let e = t; e && e.tagName !== 'svg'; e = e.parentElement) {
        const s = window.getComputedStyle(e);
        if (s.display === 'none' || s.opacity === '0') { hidden = true; break; }
      }
      if (hidden) return;
      const r = t.getBoundingClientRect();
      if (r.width < 1 || r.height < 1) return;
      out.push({chart: c, text, x: r.x, y: r.y, w: r.width, h: r.height});
    });
  });
  return out;
}
"""


def overlapping_text(page: Page, tolerance: float = 1.5) -> list[str]:
    """Pairs of text boxes in one chart that overlap by more than ``tolerance`` px each way."""
    boxes = page.evaluate(_BOXES_JS)
    problems = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["chart"] != b["chart"]:
                continue
            dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
            dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
            if dx > tolerance and dy > tolerance:
                problems.append(f"chart {a['chart']}: {a['text']!r} overlaps {b['text']!r}")
    return problems


def chart_count(page: Page) -> int:
    return page.locator('[data-testid="stPlotlyChart"]').count()

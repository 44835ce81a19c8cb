// Line charts as SVG: one chart per metric key, one series per reporter; no library, no inline code.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 260;
const MARGIN = { top: 12, right: 16, bottom: 44, left: 60 };
// Colour and dash pattern both tell series apart, so colour is never the only signal.
const STYLES = [
  ["#1f77b4", ""], ["#d62728", "6 3"], ["#2ca02c", "2 3"], ["#9467bd", "8 3 2 3"],
  ["#ff7f0e", "4 4"], ["#17becf", "1 2"], ["#8c564b", "10 4"], ["#e377c2", "3 6"],
];
const SERVER_STYLE = ["#111111", ""];

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

/** About five round tick values covering [low, high]. */
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const rough = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * magnitude).find((s) => s >= rough) ?? rough;
  const values = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    values.push(Number(value.toPrecision(12)));
  }
  return values;
}

function label(value) {
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude >= 1e5 || magnitude < 1e-3)) return value.toExponential(1);
  return String(Number(value.toPrecision(4)));
}

function bounds(values, pad) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (low === high) {
    low -= pad || 1;
    high += pad || 1;
  }
  return [low, high];
}

/**
 * An SVG line chart of `series` ([{name, server, points: [[x, y], ...]}]) for the metric `key`, with
 * labelled axes, a legend, and a point per value (its <title> says whose it is).
 */
export function lineChart(key, series, xLabel) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  const caption = document.createElement("figcaption");
  caption.textContent = key;
  const all = series.flatMap((s) => s.points);
  const [x0, x1] = bounds(all.map((p) => p[0]), 1);
  const [y0, y1] = bounds(all.map((p) => p[1]), 0.5);
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": `${key} chart`, class: "chart-svg",
    "data-points": all.length,
  });
  root.append(svg("title", {}, `${key}: ${series.length} series, ${all.length} values`));
  const axes = svg("g", { class: "axes" });
  for (const value of ticks(y0, y1)) {
    axes.append(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: sy(value), y2: sy(value), class: "grid" }));
    axes.append(svg("text", { x: MARGIN.left - 6, y: sy(value) + 4, "text-anchor": "end" }, label(value)));
  }
  for (const value of ticks(x0, x1).filter((v) => Number.isInteger(v))) {
    axes.append(svg("text", { x: sx(value), y: HEIGHT - MARGIN.bottom + 16, "text-anchor": "middle" }, label(value)));
  }
  axes.append(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: HEIGHT - MARGIN.bottom, y2: HEIGHT - MARGIN.bottom, class: "axis" }));
  axes.append(svg("line", { x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom, class: "axis" }));
  axes.append(svg("text", { x: MARGIN.left + plotW / 2, y: HEIGHT - 8, "text-anchor": "middle", class: "axis-label" }, xLabel));
  axes.append(svg("text", {
    x: 14, y: MARGIN.top + plotH / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 14 ${MARGIN.top + plotH / 2})`,
  }, key));
  root.append(axes);

  const legend = document.createElement("ul");
  legend.className = "legend";
  series.forEach((one, index) => {
    const [colour, dash] = one.server ? SERVER_STYLE : STYLES[index % STYLES.length];
    const points = [...one.points].sort((a, b) => a[0] - b[0]);
    const group = svg("g", { class: one.server ? "series server" : "series" });
    group.append(svg("polyline", {
      points: points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none", stroke: colour,
      "stroke-width": one.server ? 2.5 : 1.8, "stroke-dasharray": dash,
    }));
    for (const [x, y] of points) {
      const dot = svg("circle", { cx: sx(x), cy: sy(y), r: 3.2, fill: colour });
      dot.append(svg("title", {}, `${one.name}, ${xLabel} ${x}: ${label(y)}`));
      group.append(dot);
    }
    root.append(group);
    const item = document.createElement("li");
    const swatch = svg("svg", { width: 28, height: 10, "aria-hidden": "true" });
    swatch.append(svg("line", { x1: 0, x2: 28, y1: 5, y2: 5, stroke: colour, "stroke-width": 2.5, "stroke-dasharray": dash }));
    item.append(swatch, ` ${one.name}`);
    legend.append(item);
  });
  figure.append(caption, root, legend);
  return figure;
}

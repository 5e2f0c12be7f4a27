// A line chart on a canvas, written for the studio (no library): several series of (x, y) points over shared axes
// with "nice" tick values, an optional log y axis, and a colour per series.
"use strict";

const PALETTE = ["#3b6ea8", "#d1495b", "#2a9d8f", "#e9a03b", "#6d597a", "#4d908e", "#b5838d", "#577590"];

function niceStep(range, ticks) {
  // the 1-2-5 step that gives about `ticks` intervals over `range`
  const raw = range / Math.max(ticks, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10) * mag;
}

function formatTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return String(Math.round(v * 1e4) / 1e4);
}

// series: [{name, color, points: [[x, y], ...]}]; options: {logY, xLabel, yLabel}
function drawChart(canvas, series, options = {}) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 64, R = 14, T = 14, B = 38;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  const ty = (y) => (options.logY ? Math.log10(y) : y);
  const pts = series.flatMap((s) => s.points.filter((p) => Number.isFinite(p[1]) && (!options.logY || p[1] > 0)));
  canvas.dataset.points = String(pts.length);
  if (!pts.length) {
    ctx.fillStyle = "#6b7280";
    ctx.fillText("no points yet", W / 2 - 30, H / 2);
    return;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => ty(p[1]))), y1 = Math.max(...pts.map((p) => ty(p[1])));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (ty(y) - y0) / (y1 - y0)) * (H - T - B);
  // grid and ticks
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#6b7280"; ctx.lineWidth = 1;
  const xs = niceStep(x1 - x0, 8);
  for (let x = Math.ceil(x0 / xs) * xs; x <= x1 + 1e-9; x += xs) {
    ctx.beginPath(); ctx.moveTo(sx(x), T); ctx.lineTo(sx(x), H - B); ctx.stroke();
    ctx.fillText(formatTick(x), sx(x) - 8, H - B + 14);
  }
  const ys = niceStep(y1 - y0, 6);
  for (let y = Math.ceil(y0 / ys) * ys; y <= y1 + 1e-9; y += ys) {
    const py = T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    ctx.beginPath(); ctx.moveTo(L, py); ctx.lineTo(W - R, py); ctx.stroke();
    ctx.fillText(formatTick(options.logY ? Math.pow(10, y) : y), 4, py + 4);
  }
  ctx.fillText(options.xLabel || "step", W / 2 - 10, H - 6);
  // the series
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const p = s.points.filter((q) => Number.isFinite(q[1]) && (!options.logY || q[1] > 0));
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1.8;
    ctx.beginPath();
    p.forEach((q, j) => (j ? ctx.lineTo(sx(q[0]), sy(q[1])) : ctx.moveTo(sx(q[0]), sy(q[1]))));
    ctx.stroke();
    if (p.length < 40) p.forEach((q) => { ctx.beginPath(); ctx.arc(sx(q[0]), sy(q[1]), 2.5, 0, 7); ctx.fill(); });
  });
}

window.drawChart = drawChart;
window.PALETTE = PALETTE;

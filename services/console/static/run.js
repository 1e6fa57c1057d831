// The run page's chart: loss and ε against optimizer steps, drawn by uPlot. The points
// are the trainer's record of the run (ListTrainingSteps through the console), so a
// reopened page shows the whole run; the page polls the progress endpoint and redraws
// whenever the record changes.
(function () {
  "use strict";
  const box = document.getElementById("chart");
  if (!box || typeof uPlot === "undefined") return;
  const status = document.getElementById("chart-status");
  const stepCount = document.getElementById("step-count");
  const url = box.dataset.progressUrl;
  const pollMs = Number(box.dataset.pollMs) || 2000;
  const initial = JSON.parse(box.dataset.initial);
  let points = initial.points;  // [step, ε or null, loss or null]

  function series() {
    const budget = initial.epsilon_budget;
    return [
      points.map(p => p[0]),
      points.map(p => p[1]),
      points.map(() => budget),
      points.map(p => p[2]),
    ];
  }

  const plot = new uPlot({
    width: Math.max(box.clientWidth, 280),
    height: 320,
    scales: { x: { time: false }, eps: {}, loss: {} },
    // Steps are whole numbers: no ticks between them.
    axes: [
      { label: "optimizer step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] },
      { label: "ε spent", scale: "eps" },
      { label: "loss per token", scale: "loss", side: 1, grid: { show: false } },
    ],
    series: [
      { label: "step" },
      { label: "ε", scale: "eps", stroke: "#b3261e", width: 2, points: { show: true, size: 6 } },
      { label: "ε budget", scale: "eps", stroke: "#555", dash: [6, 4], show: initial.epsilon_budget !== null },
      { label: "loss", scale: "loss", stroke: "#1a5fb4", width: 2, points: { show: true, size: 5 } },
    ],
  }, series(), box);
  box.dataset.points = String(points.length);

  // The "Privacy spent" card follows the run too: DP steps, the bar and its label.
  function showSpent(progress) {
    const dpSteps = document.getElementById("dp-steps");
    if (dpSteps) dpSteps.textContent = String(progress.dp_steps);
    const meter = document.querySelector("#privacy-bar meter");
    const label = document.querySelector("#privacy-bar .bar-text");
    if (!meter || !label || progress.epsilon === null || !progress.epsilon_budget) return;
    const spent = progress.epsilon.toFixed(3), budget = progress.epsilon_budget.toFixed(3);
    meter.value = Math.min(progress.epsilon / progress.epsilon_budget, 1);
    meter.setAttribute("aria-label", "Privacy budget: ε spent " + spent + " of budget " + budget);
    label.textContent = "ε " + spent + " / " + budget;
  }

  function describe(progress) {
    const eps = progress.epsilon === null ? "not private" : "ε " + progress.epsilon.toFixed(3);
    const last = points[points.length - 1];
    const loss = last && last[2] !== null ? ", loss " + last[2].toFixed(4) : "";
    status.textContent = points.length + " points; step " + progress.step + ", " + eps + loss;
  }
  describe(initial);

  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) {
        const progress = await response.json();
        if (JSON.stringify(progress.points) !== JSON.stringify(points)) {
          points = progress.points;
          plot.setData(series());
          box.dataset.points = String(points.length);
        }
        if (stepCount) stepCount.textContent = String(progress.step);
        showSpent(progress);
        describe(progress);
      } else if (response.status === 401 || response.status === 303) {
        status.textContent = "Signed out: sign in again to keep following the run.";
        return;
      }
    } catch (e) {
      status.textContent = "The console did not answer; retrying.";
    }
    setTimeout(poll, pollMs);
  }
  setTimeout(poll, pollMs);
  window.addEventListener("resize", () => plot.setSize({ width: Math.max(box.clientWidth, 280), height: 320 }));
})();

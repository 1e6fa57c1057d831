// The run page's chart: ε against optimizer steps, drawn by uPlot. The page polls the
// run's progress endpoint and adds a point whenever the step count moves; the points of
// this browser tab are kept in sessionStorage so a reload does not lose them.
(function () {
  "use strict";
  const box = document.getElementById("chart");
  if (!box || typeof uPlot === "undefined") return;
  const status = document.getElementById("chart-status");
  const stepCount = document.getElementById("step-count");
  const url = box.dataset.progressUrl;
  const pollMs = Number(box.dataset.pollMs) || 2000;
  const initial = JSON.parse(box.dataset.initial);
  const storeKey = "tensafe.console.run." + initial.id;
  let points = [];
  try { points = JSON.parse(sessionStorage.getItem(storeKey) || "[]"); } catch (e) { points = []; }

  function add(progress) {
    const last = points[points.length - 1];
    if (last && last[0] === progress.step) return false;
    if (last && progress.step < last[0]) points = [];  // LoadState rolled the run back
    points.push([progress.step, progress.epsilon]);
    sessionStorage.setItem(storeKey, JSON.stringify(points));
    return true;
  }

  function series() {
    const budget = initial.epsilon_budget;
    return [
      points.map(p => p[0]),
      points.map(p => p[1]),
      points.map(() => budget),
    ];
  }

  add(initial);
  const plot = new uPlot({
    width: Math.max(box.clientWidth, 280),
    height: 320,
    scales: { x: { time: false } },
    // Steps are whole numbers: no ticks between them.
    axes: [{ label: "optimizer step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] }, { label: "ε spent" }],
    series: [
      { label: "step" },
      { label: "ε", stroke: "#b3261e", width: 2, points: { show: true, size: 6 } },
      { label: "ε budget", stroke: "#555", dash: [6, 4], show: initial.epsilon_budget !== null },
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
    status.textContent = points.length + " points; step " + progress.step + ", " + eps;
  }
  describe(initial);

  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) {
        const progress = await response.json();
        if (add(progress)) {
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

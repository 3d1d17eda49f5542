/* Charts are described by the server as JSON (json_script) next to a <canvas data-chart="ID">;
   htmx.onLoad runs for the first page and for every fragment htmx swaps in, so polled panels
   get fresh charts without a page reload. */
(function () {
  "use strict";
  var palette = ["#2457c5", "#1f8a4c", "#c53030", "#b7791f", "#805ad5", "#2b6cb0", "#718096", "#dd6b20"];

  function initCharts(root) {
    var canvases = root.querySelectorAll ? root.querySelectorAll("canvas[data-chart]") : [];
    canvases.forEach(function (canvas) {
      var source = document.getElementById(canvas.dataset.chart);
      if (!source || typeof Chart === "undefined") return;
      var spec = JSON.parse(source.textContent);
      var old = Chart.getChart(canvas);
      if (old) old.destroy();
      (spec.data.datasets || []).forEach(function (ds, i) {
        var colour = ds.color || palette[i % palette.length];
        if (spec.type === "doughnut" || spec.type === "pie") {
          ds.backgroundColor = ds.backgroundColor || spec.data.labels.map(function (_, j) { return palette[j % palette.length]; });
        } else {
          ds.backgroundColor = ds.backgroundColor || colour;
          ds.borderColor = ds.borderColor || colour;
        }
      });
      new Chart(canvas, {
        type: spec.type,
        data: spec.data,
        options: Object.assign({
          animation: false,
          responsive: true,
          maintainAspectRatio: false,
          plugins: { legend: { display: spec.legend !== false, position: "bottom" } }
        }, spec.options || {})
      });
    });
  }

  if (window.htmx) {
    htmx.onLoad(initCharts);
  } else {
    document.addEventListener("DOMContentLoaded", function () { initCharts(document); });
  }

  /* A <select data-fills="ID"> copies its choice into the field ID (the wizard's wave templates),
     announced as input so the live preview follows. Here, not inline: the CSP refuses inline handlers. */
  document.addEventListener("change", function (event) {
    var select = event.target;
    if (!select.dataset || !select.dataset.fills || !select.value) return;
    var target = document.getElementById(select.dataset.fills);
    if (!target) return;
    target.value = select.value;
    target.dispatchEvent(new Event("input", { bubbles: true }));
  });

  /* Plain (non-htmx) forms that change something ask first, with the text the server wrote. */
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.dataset && form.dataset.confirm && !form.hasAttribute("hx-post")) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    }
  }, true);
})();

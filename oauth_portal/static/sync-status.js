/* "Sync now" status without reloading the page.
 *
 * Loaded (deferred, same origin: the CSP allows no inline script) on pages that show sync requests.
 * While a request is pending it polls the small JSON endpoint given in data-status-url, starting at
 * data-poll-ms and backing off x1.5 up to 60 s; it pauses while the tab is hidden, gives up after 30
 * minutes, and stops as soon as nothing is pending. Each platform's status element
 * ([data-sync-platform]) is updated in place; when a sync finishes, a link offers to show the new data.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || !window.fetch) { return; }
  var url = script.getAttribute("data-status-url");
  var first = parseInt(script.getAttribute("data-poll-ms"), 10) || 3000;
  var pending = script.getAttribute("data-pending") === "yes";
  var MAX_DELAY = 60000, GIVE_UP_AFTER = 30 * 60 * 1000;
  var delay = first, started = Date.now(), timer = null, finished = false, inFlight = false;

  function render(el, status) {
    var label = el.querySelector(".label"), message = el.querySelector(".message");
    if (!label) {
      label = document.createElement("strong"); label.className = "label"; el.appendChild(label);
      el.appendChild(document.createTextNode(" "));
    }
    if (!message) { message = document.createElement("span"); message.className = "message"; el.appendChild(message); }
    label.textContent = status.label;
    message.textContent = status.message;
    el.setAttribute("data-state", status.state);
    el.className = "sync-request state-" + status.state;
  }

  function offerReload() {
    if (finished) { return; }
    finished = true;
    var els = document.querySelectorAll("[data-sync-platform]");
    for (var i = 0; i < els.length; i++) {
      var state = els[i].getAttribute("data-state");
      if (state === "success" || state === "failed" || state === "cancelled") {
        var link = document.createElement("a");
        link.href = window.location.href.split("#")[0];
        link.className = "reload";
        link.textContent = state === "success" ? " Show the new data" : " Refresh the page";
        els[i].appendChild(link);
        return;
      }
    }
  }

  function schedule() {
    if (Date.now() - started > GIVE_UP_AFTER) { return; }
    timer = window.setTimeout(poll, delay);
    delay = Math.min(MAX_DELAY, Math.round(delay * 1.5));
  }

  function poll() {
    timer = null;
    if (document.hidden || inFlight) { return; }  // resumed by visibilitychange
    inFlight = true;
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok || (response.headers.get("Content-Type") || "").indexOf("json") < 0) {
          throw new Error("status " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        inFlight = false;
        var platforms = data.platforms || {};
        var els = document.querySelectorAll("[data-sync-platform]");
        for (var i = 0; i < els.length; i++) {
          var status = platforms[els[i].getAttribute("data-sync-platform")];
          if (status) { render(els[i], status); }
        }
        if (data.pending) { schedule(); } else { offerReload(); }
      })
      .catch(function () { inFlight = false; schedule(); });  // a network hiccup: keep backing off
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && pending && !finished && timer === null && !inFlight) { delay = first; poll(); }
  });
  if (pending) { schedule(); }
})();

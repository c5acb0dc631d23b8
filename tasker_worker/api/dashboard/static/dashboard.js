// tasker-worker dashboard: the page refreshes its content in place, and remembers the operator
// token for the tab. Everything works without this script except the automatic refresh.
(function () {
  "use strict";
  var TOKEN_KEY = "tasker-operator-token";
  var main = document.getElementById("live");
  if (!main) { return; }

  function fillTokens() {
    var saved = null;
    try { saved = window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { saved = null; }
    if (!saved) { return; }
    main.querySelectorAll('input[name="token"]').forEach(function (input) {
      if (!input.value) { input.value = saved; }
    });
  }

  var touched = false; // once the operator types or chooses in a form, the page stays as it is
  main.addEventListener("input", function () { touched = true; });
  main.addEventListener("change", function () { touched = true; });
  main.addEventListener("submit", function (event) {
    var token = event.target.querySelector('input[name="token"]');
    if (token && token.value) {
      try { window.sessionStorage.setItem(TOKEN_KEY, token.value); } catch (e) { /* private mode */ }
    }
  });
  fillTokens();

  var every = parseInt(main.getAttribute("data-refresh") || "0", 10) * 1000;
  if (!every) { return; }
  var delay = every;
  var MAX_DELAY = 60000;

  function busy() {
    var active = document.activeElement;
    return touched || document.hidden || (active && main.contains(active) && active.matches("input, select, textarea, button"));
  }

  function schedule() { window.setTimeout(refresh, delay); }

  function refresh() {
    if (busy()) { schedule(); return; }
    var controller = new AbortController();
    var timer = window.setTimeout(function () { controller.abort(); }, 10000);
    fetch(window.location.href, { headers: { "X-Tasker-Partial": "1" }, signal: controller.signal, credentials: "same-origin" })
      .then(function (response) {
        // A 404 or 400 page is content (the worker or step is gone); other failures are not.
        if (!response.ok && response.status !== 404 && response.status !== 400) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (!busy()) {
          main.innerHTML = html;
          fillTokens();
          var stamp = document.querySelector("footer .as-of");
          if (stamp) { stamp.textContent = "as of " + new Date().toISOString().replace("T", " ").slice(0, 19) + " UTC"; }
        }
        delay = every;
      })
      .catch(function () {
        // The server is away: say the page is stale, and back off.
        var stamp = document.querySelector("footer .as-of");
        if (stamp && stamp.textContent.indexOf("not refreshed") < 0) {
          stamp.textContent = stamp.textContent.replace("as of", "not refreshed since");
        }
        delay = Math.min(delay * 2, MAX_DELAY);
      })
      .then(function () { window.clearTimeout(timer); schedule(); });
  }
  schedule();
})();

// iotgw web UI: confirmation prompts and live dashboard counters. No framework, no inline script (the CSP
// forbids it), and text goes into the page only through textContent, never as HTML.
"use strict";

document.addEventListener("submit", (event) => {
  const message = event.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
});

// GET needs no CSRF token; writes made with fetch would send it in the X-CSRF-Token header, from
// <meta name="csrf-token">.
async function refreshSummary() {
  const response = await fetch("/api/v1/summary", { credentials: "same-origin" });
  if (!response.ok) {
    return;
  }
  const summary = await response.json();
  for (const el of document.querySelectorAll("[data-summary]")) {
    const value = summary[el.getAttribute("data-summary")];
    if (value !== undefined) {
      el.textContent = String(value);
    }
  }
}

if (document.getElementById("summary")) {
  window.setInterval(() => { refreshSummary().catch(() => {}); }, 15000);
}

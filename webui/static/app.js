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
let summaryTimer = null;

async function refreshSummary() {
  const response = await fetch("/api/v1/summary", { credentials: "same-origin" });
  if (response.status === 401) {
    sessionEnded();
    return;
  }
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
  // A card that only matters when its counter is above 0 (devices not listed) comes and goes with it.
  for (const el of document.querySelectorAll("[data-summary-shown]")) {
    const value = summary[el.getAttribute("data-summary-shown")];
    if (value !== undefined) {
      el.hidden = !value;
    }
  }
}

// The session is over (12 h, a logout elsewhere, a password change): the counters would silently stop
// changing, so say so, offer a login that comes back here, and stop asking.
function sessionEnded() {
  window.clearInterval(summaryTimer);
  if (document.getElementById("session-ended")) {
    return;
  }
  const note = document.createElement("p");
  note.id = "session-ended";
  note.className = "flash";
  note.setAttribute("role", "alert");
  const link = document.createElement("a");
  const login = document.getElementById("summary").getAttribute("data-login");
  link.href = login + "?next=" + encodeURIComponent(window.location.pathname + window.location.search);
  link.textContent = "log in again";
  note.append("Session ended - ", link);
  document.querySelector("main").prepend(note);
  for (const el of document.querySelectorAll("[data-summary]")) {
    el.classList.add("stale");
  }
}

if (document.getElementById("summary")) {
  summaryTimer = window.setInterval(() => { refreshSummary().catch(() => {}); }, 15000);
}

// A schedule's empty range (from and to the same) is refused by the server; said as the times are typed, so that
// the form is not sent and emptied by the page that says why. An end before the start is the next day's.
function clockMinutes(text) {
  const parts = /^(\d{1,2}):(\d{2})$/.exec(text.trim());
  return parts ? Number(parts[1]) * 60 + Number(parts[2]) : null;
}

const scheduleForm = document.getElementById("schedule-form");
if (scheduleForm) {
  const start = scheduleForm.elements.namedItem("start");
  const end = scheduleForm.elements.namedItem("end");
  const check = () => {
    const from = clockMinutes(start.value);
    const to = clockMinutes(end.value);
    const empty = from !== null && to !== null && to === from;
    end.setCustomValidity(empty ? `${start.value}-${end.value} is empty: give an end other than the start ` +
      "(the whole day is 00:00-24:00)" : "");
  };
  start.addEventListener("input", check);
  end.addEventListener("input", check);
}

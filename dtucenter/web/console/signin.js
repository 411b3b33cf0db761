// The sign-in page: the token goes once, as a bearer token, to POST /api/session, which sets the session cookie.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("signin-form");
  const error = document.getElementById("signin-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const token = document.getElementById("token").value.trim();
    let message = null;
    try {
      const response = await fetch("/api/session", {
        method: "POST",
        headers: {"Authorization": "Bearer " + token},
        credentials: "same-origin",
      });
      if (response.ok) {
        window.location.replace("/");
        return;
      }
      const body = await response.json().catch(() => ({}));
      message = response.status === 401 ? "That token is not valid (or was revoked)." : (body.error || response.statusText);
    } catch (e) {
      message = "The center cannot be reached: " + e.message;
    }
    error.textContent = message;
    error.hidden = false;
  });
  document.getElementById("token").focus();
});

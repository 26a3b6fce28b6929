"""Browser tests: ssehub.js and the dashboard page in a real headless Chromium."""

"""The study's report as a value, and what it is drawn as: tables, plots, the HTML page."""

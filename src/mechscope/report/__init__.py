"""Reports: self-contained HTML pages with embedded interactive figures."""

"""One module per tab of the dashboard; each draws its tab from the sidebar's :class:`View` and the page's data."""

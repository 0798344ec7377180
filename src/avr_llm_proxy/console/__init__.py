"""The operator console (`GET /console`): live calls of every worker and replica, each call's timeline.

Plain HTML, CSS and JavaScript from this package, no build step and nothing fetched from elsewhere.
"""

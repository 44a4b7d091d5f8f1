"""The round protocol, shared by every transport (numpy only): strategy, schedules, aggregation
rules, fleet costs, run files and the round driver."""

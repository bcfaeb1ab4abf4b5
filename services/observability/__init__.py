"""What SREs see of a process: its JSON log (logs.py) and the call context on its lines
(log_context.py); metrics live beside what they measure."""

"""Exit statuses that carry meaning between Switchyard's processes.

A supervisor reads them to choose between restarting a process and giving up: a process that
exits with :data:`CANNOT_START` failed on something a restart cannot fix (an unsupported
model architecture, a bad flag or setting, missing model files), so restarting it would only
loop. Any other non-zero status is a crash worth a restart.
"""

from __future__ import annotations

# EX_CONFIG from sysexits.h: "something was found in an unconfigured or misconfigured state".
CANNOT_START = 78

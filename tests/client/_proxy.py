"""Moved: the fault proxy is ``mock_server.chaos.ChaosProxy`` (``HttpFault``, ``WsFault``)."""

from mock_server.chaos import ChaosProxy as Proxy
from mock_server.chaos import HttpFault as Fault
from mock_server.chaos import WsFault

__all__ = ["Fault", "Proxy", "WsFault"]

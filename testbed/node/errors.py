"""The one error the node raises: which component could not start or act, why, and its log tail."""

from __future__ import annotations

from typing import Any

__all__ = ["NodeError", "NodeComponentError", "NodeUnavailable"]


class NodeError(RuntimeError):
    """The node could not be brought up, operated or torn down; the message says why."""


class NodeUnavailable(NodeError):
    """This machine cannot run a node at all (not root, a package or a binary missing): tests skip
    on it, with this message, and fail on any other NodeError."""


class NodeComponentError(NodeError):
    """``component`` (containerd, kubelet, kube-proxy, ...) failed; the message carries its log tail."""

    def __init__(self, component: str, reason: str, process: Any = None) -> None:
        self.component = component
        message = f"{component}: {reason}"
        if process is not None:
            status = process.exit_status()
            state = "still running" if status is None else f"exited with status {status}"
            message += f" ({state}); last lines of {process.log_path}:\n{process.tail()}"
        super().__init__(message)

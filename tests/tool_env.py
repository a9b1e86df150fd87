"""Tools the tests talk to that live in virtual environments of their own (Label Studio,
datumaro), installed by ``scripts/tool_env.sh`` through a script per tool when missing.

Where a tool cannot be installed (no registry, no compiler, no disk), its tests skip loudly, or
fail when the tool's ``require`` variable (e.g. STABLESEG_REQUIRE_LABEL_STUDIO=1, set by CI) is
set.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 1200


class ToolUnavailable(RuntimeError):
    """A tool could not be installed here."""


@dataclass(frozen=True)
class Tool:
    """One tool's environment: where it lives and how it is installed."""

    name: str  # as messages say it
    script: str  # under scripts/, takes the venv folder as its argument
    venv_variable: str  # the variable that moves its environment
    default_venv: Path
    marker: str  # a file under the venv that exists once installed
    require_variable: str  # set: a tool that cannot be installed fails its tests

    def venv(self) -> Path:
        return Path(os.environ.get(self.venv_variable) or self.default_venv).expanduser()

    def ensure_installed(self, venv: Path | None = None) -> Path:
        """The tool's environment, installed by its script if missing."""
        venv = venv or self.venv()
        if (venv / self.marker).exists():
            return venv
        logger.warning("%s is not in %s: installing it", self.name, venv)
        try:
            done = subprocess.run(
                ["bash", str(ROOT / "scripts" / self.script), str(venv)],
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ToolUnavailable(f"installing {self.name} failed: {err}") from None
        if done.returncode != 0 or not (venv / self.marker).exists():
            raise ToolUnavailable(
                f"installing {self.name} into {venv} failed (exit {done.returncode}):\n"
                + done.stderr[-3000:]
            )
        return venv

    def installed_or_skip(self) -> Path:
        """The environment, or a loud skip where it cannot be installed (a failure instead
        when :attr:`require_variable` is set)."""
        import pytest

        try:
            return self.ensure_installed()
        except ToolUnavailable as err:
            message = (
                "\n" + "!" * 78 + f"\n{self.name.upper()} TESTS SKIPPED: {self.name} could not "
                f"be installed into {self.venv()}:\n{err}\n" + "!" * 78
            )
            logger.error(message)
            sys.stderr.write(message + "\n")
            if os.environ.get(self.require_variable):
                pytest.fail(message)
            pytest.skip(message)


CACHE = Path.home() / ".cache" / "stableseg"
LABEL_STUDIO = Tool(
    name="Label Studio",
    script="labelstudio_env.sh",
    venv_variable="LABEL_STUDIO_VENV",
    default_venv=CACHE / "ls-venv",
    marker="bin/label-studio",
    require_variable="STABLESEG_REQUIRE_LABEL_STUDIO",
)
DATUMARO = Tool(
    name="datumaro",
    script="datumaro_env.sh",
    venv_variable="DATUMARO_VENV",
    default_venv=CACHE / "datumaro-venv",
    marker="bin/datum",
    require_variable="STABLESEG_REQUIRE_TOOLS",
)

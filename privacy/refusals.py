"""Why a site refuses a round: the reason goes back to the server, and no update leaves the site."""

from __future__ import annotations

import math
from typing import Optional

from privacy.accounting import PrivacyLedger


class SiteRefusal(RuntimeError):
    """The site refuses to train this round; ``reason`` goes back to the server."""

    exhausted = False

    def __init__(self, reason: str, *, epsilon: float, ledger: Optional[PrivacyLedger] = None):
        super().__init__(reason)
        self.reason = reason
        self.epsilon = epsilon
        self.ledger = ledger


class BudgetExhausted(SiteRefusal):
    """The site refuses to train: its privacy budget does not cover the round."""

    exhausted = True


def require_dp(node_config_budget: bool, privacy_enabled: bool, site: str) -> None:
    """A site that set its own budget never trains without DP, whatever the server's config says."""
    if node_config_budget and not privacy_enabled:
        raise SiteRefusal(f"site {site}: its node config sets epsilon-budget, so it trains only with DP, but the "
                          "server's config has privacy.enabled=false; refusing to train", epsilon=math.inf)

"""Virtual keys for the real LiteLLM proxy in the tests, without a database.

The company gateway keeps its virtual keys (and their spend) in Postgres. Without a database
the proxy accepts only its master key and answers every other key with
``400 {"error": {"type": "no_db_connection", "message": "No connected db."}}``, which no real
gateway ever says. This module is the proxy's ``general_settings.custom_auth`` hook and
stands in for the key table only; every answer is still produced by the proxy's own code:

- an unknown key raises the proxy's own ``KeyNotFoundError`` (what its DB lookup raises), so
  the 401 body is the real "Invalid proxy server token" one;
- a known key whose spend has reached its ``max_budget`` goes through the proxy's own
  ``virtual_key_max_budget_check``, which raises ``BudgetExceededError``: the real
  ``budget_exceeded`` answer (status ``litellm.budget_exceeded_status_code``, 422 in 1.110.2);
- a known key within budget is let through as that virtual key.

The keys come from the environment variable ``LEDGER_PROXY_KEYS``: a JSON object
``{"<key>": {"alias": "...", "max_budget": 10.0, "spend": 0.0}, ...}`` (written by
tests/proxy/harness.py). Loaded by the proxy as ``custom_auth: gateway_auth.user_api_key_auth``
with this folder on PYTHONPATH.

``request_log`` (``litellm_settings.callbacks: gateway_auth.request_log``) stands in for the
spend log (LiteLLM_SpendLogs needs the database): for every request the proxy finishes, it
appends one JSON line with what the proxy's spend tracking would record (key alias, end user,
request tags, the caller's metadata, tokens, cost, status) to the file named by
``LEDGER_PROXY_REQUEST_LOG``.
"""

from __future__ import annotations

import json
import os

from fastapi import Request
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import UserAPIKeyAuth, hash_token
from litellm.proxy.auth.auth_checks import virtual_key_max_budget_check
from litellm.proxy.auth.resolvers.exceptions import KeyNotFoundError

KEYS: dict[str, dict] = json.loads(os.environ.get("LEDGER_PROXY_KEYS", "{}"))


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    from litellm.proxy.proxy_server import proxy_logging_obj

    key = (api_key or "").removeprefix("Bearer ").strip()
    spec = KEYS.get(key)
    if spec is None:
        raise KeyNotFoundError(hash_token(key) if key.startswith("sk-") else key)
    token = UserAPIKeyAuth(
        api_key=key,
        token=hash_token(key),
        key_alias=spec.get("alias"),
        max_budget=spec.get("max_budget"),
        spend=spec.get("spend", 0.0),
    )
    await virtual_key_max_budget_check(valid_token=token, proxy_logging_obj=proxy_logging_obj)
    return token


class RequestLog(CustomLogger):
    """One JSON line per finished request, from the proxy's StandardLoggingPayload."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path

    def _write(self, kwargs: dict, status: str) -> None:
        payload = kwargs.get("standard_logging_object") or {}
        metadata = payload.get("metadata") or {}
        line = {
            "status": status,
            "model_group": payload.get("model_group"),
            "key_alias": metadata.get("user_api_key_alias"),
            "end_user": payload.get("end_user") or None,
            "request_tags": payload.get("request_tags") or [],
            "requester_metadata": metadata.get("requester_metadata") or {},
            "prompt_tokens": payload.get("prompt_tokens"),
            "completion_tokens": payload.get("completion_tokens"),
            "response_cost": payload.get("response_cost"),
            "error_str": payload.get("error_str"),
        }
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, default=str) + "\n")

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, "success")

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, "failure")


request_log = RequestLog(os.environ.get("LEDGER_PROXY_REQUEST_LOG"))

#!/usr/bin/env bash
# The HTTP API with curl: the models, a chat (whole and streamed as SSE), and the native
# /generate route every model has.
#
#   mstar serve testvla --preset tiny --load-format dummy     # in another shell
#   bash examples/curl_chat.sh
#
# MSTAR_URL picks the server (default http://localhost:8000), MSTAR_API_KEY the key if it
# has one, MSTAR_MODEL the model name (default testvla). The tiny test model has random
# weights: its text is gibberish.
set -euo pipefail

URL="${MSTAR_URL:-http://localhost:8000}"
MODEL="${MSTAR_MODEL:-testvla}"
AUTH=()
if [[ -n "${MSTAR_API_KEY:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${MSTAR_API_KEY}")
fi
post() {  # post PATH JSON: fail on an HTTP error, but show its body
  curl -sS --no-buffer --fail-with-body "${AUTH[@]}" -H 'Content-Type: application/json' \
    "${URL}$1" -d "$2"
  echo
}

echo "== GET /v1/models"
curl -sS --fail-with-body "${AUTH[@]}" "${URL}/v1/models"
echo

echo "== POST /v1/chat/completions"
post /v1/chat/completions '{"model": "'"${MODEL}"'", "max_tokens": 16,
  "messages": [{"role": "user", "content": "What is the capital of France?"}]}'

echo "== POST /v1/chat/completions (stream)"
post /v1/chat/completions '{"model": "'"${MODEL}"'", "max_tokens": 8, "stream": true,
  "stream_options": {"include_usage": true},
  "messages": [{"role": "user", "content": "Tell me a story"}]}'

echo "== POST /generate"
post /generate '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'

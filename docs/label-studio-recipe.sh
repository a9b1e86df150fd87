#!/usr/bin/env bash
# The Label Studio recipe, step by step: from nothing to the demo scenes pre-annotated in a
# Label Studio project. docs/label-studio.md shows each step below exactly as it is here, and
# tests/test_labelstudio_recipe.py runs this file against a real Label Studio and checks what it
# leaves there, so the two cannot drift apart.
#
#   bash docs/label-studio-recipe.sh     (from the repository's root, its environment active)
#
# Label Studio and the backend keep running in the background afterwards; stop them with
# `kill %1 %2` from the same shell, or by their process ids (`jobs -l`).
set -euo pipefail

# --8<-- [start:settings]
LS_PORT=${LS_PORT:-8080}                   # Label Studio
BACKEND_PORT=${BACKEND_PORT:-9090}         # the StableSeg backend
WORK=${WORK:-$HOME/stableseg-label-studio} # Label Studio's data and both logs
FILES_ROOT=${FILES_ROOT:-$PWD/demo}        # the folder Label Studio may serve files from
LS_EMAIL=${LS_EMAIL:-admin@example.com}    # the first user, created at the first start
LS_PASSWORD=${LS_PASSWORD:-change-this-password}
LS_URL=http://127.0.0.1:$LS_PORT
mkdir -p "$WORK"
# --8<-- [end:settings]

# --8<-- [start:install]
LS_VENV=$(scripts/labelstudio_env.sh) # Label Studio 1.23 in its own environment (about 1 GB)
# --8<-- [end:install]

# --8<-- [start:start-label-studio]
LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true \
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="$FILES_ROOT" \
ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false \
  "$LS_VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 -p "$LS_PORT" \
  --data-dir "$WORK/label-studio-data" --username "$LS_EMAIL" --password "$LS_PASSWORD" \
  >"$WORK/label-studio.log" 2>&1 &
until curl -sf "$LS_URL/health" >/dev/null; do sleep 2; done # about 30 s
# --8<-- [end:start-label-studio]

# --8<-- [start:token]
py() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
TOKEN_FILE=$WORK/token # the personal access token, kept for the next shell (yours alone)
if [[ ! -s $TOKEN_FILE ]]; then # log in; revoke a token that was not kept; get a new one
  jar="$WORK/cookies.txt"
  csrf() { awk '$6 == "csrftoken" {print $7}' "$jar"; }
  curl -sf -c "$jar" -o /dev/null "$LS_URL/user/login/"
  curl -sf -b "$jar" -c "$jar" -o /dev/null "$LS_URL/user/login/" -H "X-CSRFToken: $(csrf)" \
    --data-urlencode "email=$LS_EMAIL" --data-urlencode "password=$LS_PASSWORD"
  for old in $(curl -sf -b "$jar" "$LS_URL/api/token/" | py '" ".join(t["token"] for t in d)'); do
    curl -sf -b "$jar" -o /dev/null -X POST "$LS_URL/api/token/blacklist/" \
      -H "X-CSRFToken: $(csrf)" -H 'Content-Type: application/json' -d "{\"refresh\": \"$old\"}"
  done
  (umask 077 && curl -sf -b "$jar" -X POST "$LS_URL/api/token/" -H "X-CSRFToken: $(csrf)" \
    | py 'd["token"]' >"$TOKEN_FILE")
fi
LABEL_STUDIO_API_KEY=$(cat "$TOKEN_FILE")
export LABEL_STUDIO_API_KEY
access() {
  curl -sf -X POST "$LS_URL/api/token/refresh/" -H 'Content-Type: application/json' \
    -d "{\"refresh\": \"$LABEL_STUDIO_API_KEY\"}" | py 'd["access"]'
}
api() { curl -sf -H "Authorization: Bearer $(access)" -H 'Content-Type: application/json' "$@"; }
# --8<-- [end:token]

# --8<-- [start:start-backend]
export LOCAL_FILES_DOCUMENT_ROOT=$FILES_ROOT # the backend and the CLI read local files from disk
LABEL_STUDIO_URL=$LS_URL stableseg serve --model demo/model \
  --background-prompt background --port "$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
until curl -sf "http://127.0.0.1:$BACKEND_PORT/health" >/dev/null; do sleep 1; done
# --8<-- [end:start-backend]

# --8<-- [start:project]
CONFIG="<View><Image name='image' value='\$image'/><BrushLabels name='tag' toName='image'>\
<Label value='red'/><Label value='green'/><Label value='blue'/><Label value='yellow'/>\
</BrushLabels></View>"
PROJECT=$(api -X POST "$LS_URL/api/projects" \
  -d "{\"title\": \"StableSeg demo\", \"label_config\": \"$CONFIG\"}" | py 'd["id"]')
# --8<-- [end:project]

# --8<-- [start:storage]
STORAGE=$(api -X POST "$LS_URL/api/storages/localfiles" -d "{\"project\": $PROJECT, \
\"title\": \"demo scenes\", \"path\": \"$FILES_ROOT/scenes/images\", \"regex_filter\": \".*png\", \
\"use_blob_urls\": true}" | py 'd["id"]')
api -X POST "$LS_URL/api/storages/localfiles/$STORAGE/sync" >/dev/null # one task per image
# --8<-- [end:storage]

# --8<-- [start:connect]
api -X POST "$LS_URL/api/ml" -d "{\"project\": $PROJECT, \"title\": \"StableSeg\", \
\"url\": \"http://127.0.0.1:$BACKEND_PORT\", \"is_interactive\": false}" >/dev/null
# --8<-- [end:connect]

# --8<-- [start:predict-some]
SOME=$(api "$LS_URL/api/tasks?project=$PROJECT&page_size=10&include=id" \
  | py 'json.dumps([t["id"] for t in d["tasks"]])')
api -X POST "$LS_URL/api/dm/actions?id=retrieve_tasks_predictions&project=$PROJECT" \
  -d "{\"selectedItems\": {\"all\": false, \"included\": $SOME}}" >/dev/null
# --8<-- [end:predict-some]

# --8<-- [start:prelabel]
VERSION=$(curl -sf "http://127.0.0.1:$BACKEND_PORT/versions" | py 'd["versions"][0]')
api -X PATCH "$LS_URL/api/projects/$PROJECT" -d "{\"model_version\": \"$VERSION\"}" >/dev/null
# --8<-- [end:prelabel]

# --8<-- [start:predict-all]
stableseg label-studio predict --url "$LS_URL" --project "$PROJECT" \
  --model demo/model --background-prompt background
# --8<-- [end:predict-all]

# --8<-- [start:review]
api -G "$LS_URL/api/tasks" --data-urlencode "project=$PROJECT" --data-urlencode "page_size=5" \
  --data-urlencode 'query={"ordering": ["tasks:predictions_score"]}' \
  --data-urlencode "include=id,predictions_score,storage_filename" \
  | py '"\n".join("%.3f  %s" % (t["predictions_score"], t["storage_filename"]) for t in d["tasks"])'
echo "project $PROJECT: open $LS_URL/projects/$PROJECT/data and log in as $LS_EMAIL"
# --8<-- [end:review]

#!/usr/bin/env bash
# Regenerates src/gen/ from protos/ with ts-proto through the npm `protoc` package (no downloads).
# The output is committed, so installing and building never need this step.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf src/gen
mkdir -p src/gen
protoc="node_modules/.bin/protoc"
"$protoc" -I protos \
  --plugin=protoc-gen-ts_proto=node_modules/.bin/protoc-gen-ts_proto \
  --ts_proto_out=src/gen \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,importSuffix=.js,forceLong=bigint,useOptionals=messages,annotateFilesWithVersion=false,useDate=false \
  $(cd protos && find . -name "*.proto" | sed "s|^./||" | sort)
# ts-proto copies every decoded bytes field (Buffer.from(reader.bytes())); a view of the received
# message is enough, and saves copying each blob a sync receives once more.
files=$(grep -rl 'Buffer.from(reader.bytes())' src/gen || true)
if [ -z "$files" ]; then
  echo "gen-protos.sh: ts-proto no longer emits Buffer.from(reader.bytes()); update the bytes-view edit" >&2
  exit 1
fi
for f in $files; do
  sed -i 's/Buffer\.from(reader\.bytes())/((b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength))(reader.bytes())/' "$f"
done
# ts-proto's header says "DO NOT EDIT"; say how to regenerate too.
for f in $(find src/gen -name '*.ts'); do
  printf '// Generated from protos/ by `npm run gen` (scripts/gen-protos.sh). Do not edit.\n%s\n' "$(cat "$f")" > "$f"
done

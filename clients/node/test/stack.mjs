// A real TenSafe stack for the tests: `tensafe up` on a fresh temporary data dir
// (which installs the built-in pretrained tiny-llama), stopped with SIGTERM after.
//
// `tensafe` is $TENSAFE_BIN, else the repository's .venv/bin/tensafe, else the one on
// PATH; the Python of that virtualenv runs the test helpers (SEAL keys).

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

export const PACKAGE_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");
const REPO_VENV_TENSAFE = join(PACKAGE_DIR, "..", "..", ".venv", "bin", "tensafe");

/** The `tensafe` executable the tests run. */
export function tensafeBin() {
  if (process.env.TENSAFE_BIN) return process.env.TENSAFE_BIN;
  if (existsSync(REPO_VENV_TENSAFE)) return REPO_VENV_TENSAFE;
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const candidate = join(dir, "tensafe");
    if (dir && existsSync(candidate)) return candidate;
  }
  throw new Error("tensafe is not installed: pip install '.[all]' (or set TENSAFE_BIN)");
}

/** Fails when src/ changed after the last build (the tests import dist/). */
export function assertBuilt() {
  const built = join(PACKAGE_DIR, "dist", "index.js");
  if (!existsSync(built)) throw new Error("dist/ is missing: run `npm run build`");
  const sources = ["client.ts", "connection.ts", "errors.ts", "health.ts", "index.ts"];
  for (const name of sources) {
    if (statSync(join(PACKAGE_DIR, "src", name)).mtimeMs > statSync(built).mtimeMs) {
      throw new Error(`src/${name} is newer than dist/: run \`npm run build\``);
    }
  }
}

/**
 * Starts `tensafe up` (extra arguments: `args`) and waits for its connection file.
 * Returns the connection, the data dir, the virtualenv's python and `stop()`.
 */
export async function startStack({ args = [], timeoutMs = 180_000 } = {}) {
  const tensafe = tensafeBin();
  const root = mkdtempSync(join(tmpdir(), "tensafe-node-"));
  const dataDir = join(root, "state");
  const connectionFile = join(dataDir, "connection.json");
  const up = spawn(tensafe, ["up", "--data-dir", dataDir, ...args], {
    cwd: root,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  up.stdout.on("data", (chunk) => (output += chunk));
  up.stderr.on("data", (chunk) => (output += chunk));
  const exited = new Promise((resolve) => up.once("exit", resolve));
  const stop = async () => {
    if (up.exitCode === null && up.signalCode === null) {
      up.kill("SIGTERM");
      const killer = setTimeout(() => up.kill("SIGKILL"), 20_000);
      await exited;
      clearTimeout(killer);
    }
    rmSync(root, { recursive: true, force: true });
  };
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(connectionFile)) {
    if (up.exitCode !== null || up.signalCode !== null) {
      await stop();
      throw new Error(`tensafe up exited (${up.exitCode ?? up.signalCode}):\n${output}`);
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`no ${connectionFile} after ${timeoutMs} ms:\n${output}`);
    }
    await sleep(100);
  }
  // The file is written whole (write then rename), so it parses once it exists.
  const connection = JSON.parse(readFileSync(connectionFile, "utf8"));
  return {
    connection,
    connectionFile,
    dataDir,
    python: join(dirname(tensafe), "python"),
    stop,
    output: () => output,
  };
}

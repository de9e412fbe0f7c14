// Owns the build: bundles the extension (vscode-languageclient included) into out/extension.js, and with
// --tests bundles each test file into out-test/ for `node --test`, and --e2e the code-server test.
import { build } from "esbuild";
import { readdirSync } from "node:fs";
import { join } from "node:path";

const common = { bundle: true, platform: "node", target: "node20", format: "cjs", sourcemap: true, logLevel: "warning" };

if (process.argv.includes("--e2e")) {
  await build({ ...common, entryPoints: ["test/e2e/code-server.ts"], outfile: "out-test/e2e/code-server.e2e.js", external: ["vscode", "playwright-core"] });
} else if (process.argv.includes("--tests")) {
  const dirs = ["test/unit", "test/protocol"];
  const entryPoints = dirs.flatMap((d) => readdirSync(d).filter((f) => f.endsWith(".test.ts")).map((f) => join(d, f)));
  await build({ ...common, entryPoints, outdir: "out-test", external: ["vscode"] });
} else {
  await build({ ...common, entryPoints: ["src/extension.ts"], outfile: "out/extension.js", external: ["vscode"], minify: true });
}

-- m31r Neovim tests: unit tests of m31r.text, then the real thing: m31rd serving the tiny seeded bundle on
-- a temp socket, a second Neovim (embedded, headless, only this plugin) with the real m31r-lsp, driven by
-- keys as a user types them. Run: nvim --headless --clean -l tests/run.lua (from editors/nvim).
-- Binaries: $M31R_LSP, $M31RD, $M31R_TINY_BUNDLE, else the workspace's target/debug. Missing binaries skip
-- the real tests with a message, or fail them when M31R_REQUIRE_REAL=1 (scripts/editor-tests.sh sets it).
local here = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h")
local plugin_root = vim.fn.fnamemodify(here, ":h")
local repo = vim.fn.fnamemodify(plugin_root, ":h:h")
package.path = ("%s/lua/?.lua;%s/lua/?/init.lua;%s"):format(plugin_root, plugin_root, package.path)

local counts = { passed = 0, failed = 0, skipped = 0 }

local function test(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if ok then
    counts.passed = counts.passed + 1
    print("ok - " .. name)
  else
    counts.failed = counts.failed + 1
    print("not ok - " .. name .. "\n    " .. tostring(err):gsub("\n", "\n    "))
  end
end

local function eq(actual, expected, what)
  if not vim.deep_equal(actual, expected) then
    error(("%s: expected %s, got %s"):format(what or "value", vim.inspect(expected), vim.inspect(actual)), 2)
  end
end

local function check(cond, what)
  if not cond then
    error(what, 2)
  end
end

-- Unit tests: the pure text logic.
local text = require("m31r.text")

test("text.remaining drops what the user typed and rejects stale items", function()
  eq(text.remaining("insert(k, v);", "ins"), "ert(k, v);")
  eq(text.remaining("insert(k, v);", ""), "insert(k, v);")
  eq(text.remaining("insert", "inx"), nil, "stale item")
  eq(text.remaining("insert", "insert"), nil, "nothing left")
end)

test("text.next_line and text.next_word", function()
  eq(text.next_line("a + b;\n    c"), "a + b;")
  eq(text.next_line("\n    c;\n}"), "\n    c;")
  eq(text.next_line("x"), "x")
  eq(text.next_word("insert(k, v);"), "insert")
  eq(text.next_word("(k, v);"), "(")
  eq(text.next_word("  foo_bar.baz"), "  foo_bar")
  eq(text.next_word(" \t"), " \t")
  eq(text.next_word("\n    let x"), "\n    ")
  eq(text.next_word("\u{e9}t\u{e9}"), "\u{e9}t\u{e9}", "non-ASCII letters are one run of non-blanks")
end)

test("minConfidence's default is m31r-lsp's DEFAULT_MIN_CONFIDENCE", function()
  -- The plugin always sends minConfidence, so a default that differs from the server's would override it.
  local rust = table.concat(vim.fn.readfile(repo .. "/lsp/src/config.rs"), "\n")
  local value = rust:match("pub const DEFAULT_MIN_CONFIDENCE: f64 = ([0-9.]+);")
  check(value ~= nil, "DEFAULT_MIN_CONFIDENCE in lsp/src/config.rs")
  eq(require("m31r").defaults.settings.minConfidence, tonumber(value), "minConfidence default")
end)

test("text.split and text.end_position", function()
  eq({ text.split("a\nb\nc") }, { "a", { "b", "c" } })
  eq({ text.split("a") }, { "a", {} })
  eq({ text.end_position(3, 4, "abc") }, { 3, 7 })
  eq({ text.end_position(3, 4, "ab\n  cd") }, { 4, 4 })
  eq({ text.end_position(3, 4, "ab\n") }, { 4, 0 })
end)

-- Real tests.
local function binary(env, rel)
  local p = vim.env[env]
  if p and p ~= "" then
    return p
  end
  return repo .. "/target/debug/" .. rel
end

local bins = {
  lsp = binary("M31R_LSP", "m31r-lsp"),
  daemon = binary("M31RD", "m31rd"),
  tiny = binary("M31R_TINY_BUNDLE", "examples/tiny_bundle"),
}
local missing = {}
for _, p in pairs(bins) do
  if vim.fn.executable(p) ~= 1 then
    table.insert(missing, p)
  end
end

local function finish()
  print(("# %d passed, %d failed, %d skipped"):format(counts.passed, counts.failed, counts.skipped))
  os.exit(counts.failed == 0 and 0 or 1)
end

if #missing > 0 then
  local msg = "missing " .. table.concat(missing, ", ")
    .. " (build: cargo build -p m31r-lsp -p m31r-daemon --bins --example tiny_bundle)"
  if vim.env.M31R_REQUIRE_REAL == "1" then
    test("real m31r-lsp and m31rd are available", function()
      error(msg)
    end)
  else
    counts.skipped = counts.skipped + 1
    print("ok - real-editor tests # SKIP " .. msg)
  end
  finish()
end

local tmp = vim.fn.tempname()
vim.fn.mkdir(tmp .. "/proj/src", "p")
local socket = tmp .. "/m31rd.sock"
local made = vim.system({ bins.tiny, tmp .. "/bundle" }, { text = true }):wait()
check(made.code == 0, "tiny_bundle failed: " .. (made.stderr or ""))
local daemon = vim.system({ bins.daemon, "--bundle", tmp .. "/bundle", "--socket", socket, "--log-file", tmp .. "/m31rd.log" })

local function connectable(path)
  local pipe = assert(vim.uv.new_pipe(false))
  local result
  pipe:connect(path, function(err)
    result = err == nil
    pipe:close()
  end)
  vim.wait(1000, function()
    return result ~= nil
  end, 10)
  return result == true
end

local function wait_for(what, timeout_ms, fn)
  local value
  local ok = vim.wait(timeout_ms, function()
    value = fn()
    return value ~= nil and value ~= false
  end, 50)
  if not ok then
    error("timed out after " .. timeout_ms .. " ms waiting for " .. what, 2)
  end
  return value
end

local child
local function cleanup()
  if child then
    pcall(vim.fn.jobstop, child)
  end
  daemon:kill(15)
  daemon:wait(10000)
  if vim.env.M31R_KEEP_TMP ~= "1" then
    vim.fn.delete(tmp, "rf")
  else
    print("# kept " .. tmp)
  end
end

local ok_daemon = vim.wait(120000, function()
  return connectable(socket) or daemon:is_closing()
end, 100)
if not ok_daemon or not connectable(socket) then
  test("m31rd listens on its socket", function()
    error("m31rd did not listen on " .. socket .. "; log: " .. table.concat(vim.fn.readfile(tmp .. "/m31rd.log"), "\n"))
  end)
  cleanup()
  finish()
end

child = vim.fn.jobstart({ vim.v.progpath, "--embed", "--headless", "--clean", "-u", here .. "/minimal_init.lua" }, {
  rpc = true,
  env = {
    M31R_LSP = bins.lsp,
    M31R_TEST_SOCKET = socket,
    M31R_LSP_LOG_FILE = tmp .. "/m31r-lsp.log",
    XDG_STATE_HOME = tmp .. "/state",
  },
})
check(child > 0, "cannot start the Neovim under test")

local function lua(code, ...)
  local result = vim.rpcrequest(child, "nvim_exec_lua", code, { ... })
  if result == vim.NIL then
    return nil
  end
  return result
end
local function input(keys)
  vim.rpcrequest(child, "nvim_input", keys)
end

-- What the Neovim under test has: buffer, cursor (0-based row, byte col), mode.
local function state()
  return lua([[
    local c = vim.api.nvim_win_get_cursor(0)
    return { lines = vim.api.nvim_buf_get_lines(0, 0, -1, true), row = c[1] - 1, col = c[2],
             mode = vim.api.nvim_get_mode().mode }
  ]])
end

-- The ghost-text extmark as drawn (inline text + virtual lines joined by newlines), or nil.
local function ghost()
  return lua([[
    local g = require("m31r.ghost")
    local marks = vim.api.nvim_buf_get_extmarks(0, g.ns, 0, -1, { details = true })
    if #marks == 0 then return nil end
    local d = marks[1][4]
    local parts = { d.virt_text[1][1] }
    for _, l in ipairs(d.virt_lines or {}) do table.insert(parts, l[1][1]) end
    return { row = marks[1][2], col = marks[1][3], text = table.concat(parts, "\n"), current = g.current(0) }
  ]])
end

-- The screen rows as the user sees them (trailing blanks trimmed).
local function screen()
  return lua([[
    vim.cmd("redraw!")
    local rows = {}
    for r = 1, vim.o.lines - 2 do
      local s = {}
      for c = 1, vim.o.columns do s[c] = vim.fn.screenstring(r, c) end
      rows[r] = (table.concat(s):gsub("%s+$", ""))
    end
    return rows
  ]])
end

-- `lines` with `insert` typed at (row, col).
local function inserted(lines, row, col, insert)
  local out = vim.list_slice(lines, 1, row)
  local line = lines[row + 1]
  local new = vim.split(line:sub(1, col) .. insert .. line:sub(col + 1), "\n", { plain = true })
  vim.list_extend(out, new)
  vim.list_extend(out, lines, row + 2)
  return out
end

-- Types `keys` in insert mode and waits for ghost text at the cursor. The tiny random model repeats the
-- last token, so the typed text ends in a token (after blanks it generates blanks, which m31r-lsp suppresses).
local function type_and_wait(keys)
  input(keys)
  return wait_for("ghost text after typing " .. keys, 60000, function()
    local g = ghost()
    local s = state()
    return g and g.row == s.row and g.col == s.col and s.mode == "i" and g or nil
  end)
end

local main_rs = tmp .. "/proj/src/main.rs"
vim.fn.writefile({ "[package]", 'name = "proj"' }, tmp .. "/proj/Cargo.toml")
vim.fn.writefile({
  "use std::collections::HashMap;",
  "",
  "fn main() {",
  "    let mut map = HashMap::new();",
  "}",
}, main_rs)
-- Wide enough that no completion wraps (the tiny model repeats a token up to maxTokens).
lua("vim.o.columns = 1000; vim.o.lines = 60")
lua("vim.cmd.edit(...)", main_rs)

test("m31r-lsp attaches to a Rust buffer", function()
  wait_for("the m31r client", 30000, function()
    return lua([[
      local c = vim.lsp.get_clients({ bufnr = 0, name = "m31r" })[1]
      return c ~= nil and c.initialized == true
    ]])
  end)
  eq(lua("return vim.bo.filetype"), "rust", "filetype")
  eq(lua("return require('m31r').uses_native()"), false, "Neovim 0.11 uses the plugin's ghost text")
end)

test("typing in insert mode shows ghost text; Tab inserts exactly what was shown", function()
  local g = type_and_wait("4GA<CR>map.in")
  eq(g.current, g.text, "the engine's text is the extmark's")
  check(#g.text > 0, "ghost text is not empty")
  local before = state()
  local shown = screen()
  input("<Tab><Esc>")
  local after = wait_for("the accepted text", 10000, function()
    local s = state()
    return s.mode == "n" and s or nil
  end)
  eq(after.lines, inserted(before.lines, before.row, before.col, g.text), "buffer after Tab")
  eq(ghost(), nil, "no ghost text left")
  eq(screen(), shown, "the screen shows the same text before (ghost) and after (buffer) accepting")
end)

test("accept word, then line, then the rest", function()
  local g = type_and_wait("o(self.x")
  local before = state()
  local word = text.next_word(g.text)
  input("<M-Right>")
  local s = wait_for("the accepted word", 10000, function()
    local st = state()
    return not vim.deep_equal(st.lines, before.lines) and st or nil
  end)
  eq(s.lines, inserted(before.lines, before.row, before.col, word), "buffer after accepting a word")
  local rest = g.text:sub(#word + 1)
  if rest == "" then
    eq(ghost(), nil, "the whole text was one word")
    return
  end
  eq(ghost().text, rest, "the rest stays shown")
  local line = text.next_line(rest)
  input("<M-C-Right>")
  s = wait_for("the accepted line", 10000, function()
    local st = state()
    return (st.row ~= s.row or st.col ~= s.col) and st or nil
  end)
  s = state()
  eq(s.lines, inserted(before.lines, before.row, before.col, word .. line), "buffer after accepting a line")
  rest = rest:sub(#line + 1)
  if rest ~= "" then
    eq(ghost().text, rest, "the rest after the line stays shown")
    input("<Tab>")
    wait_for("the rest accepted", 10000, function()
      return vim.deep_equal(state().lines, inserted(before.lines, before.row, before.col, g.text))
    end)
  end
  input("<Esc>")
end)

test("dismiss hides the ghost text; Tab without ghost text types a Tab", function()
  local g = type_and_wait("olet v = vec![")
  check(g ~= nil, "ghost text")
  local before = state()
  input("<C-]>")
  wait_for("no ghost text", 10000, function()
    return ghost() == nil
  end)
  eq(state().lines, before.lines, "dismiss does not change the buffer")
  input("<Tab>")
  local s = wait_for("the Tab", 10000, function()
    local st = state()
    return not vim.deep_equal(st.lines, before.lines) and st or nil
  end)
  local line = s.lines[before.row + 1]
  check(line:sub(1, before.col) == before.lines[before.row + 1]:sub(1, before.col), "line kept")
  check(line:sub(before.col + 1):match("^%s+$"), "Tab inserted blanks, got " .. vim.inspect(line))
  input("<Esc>")
end)

test("leaving insert mode clears the ghost text", function()
  type_and_wait("ouse std::collections::")
  input("<Esc>")
  wait_for("no ghost text after Esc", 10000, function()
    return ghost() == nil and state().mode == "n"
  end)
end)

test(":M31RStatus reports the connected daemon", function()
  local st = lua("return require('m31r').status()")
  eq(st.connected, true, "connected")
  eq(st.socket, socket, "socket")
  check(type(st.model) == "string", "a model is loaded")
  check(st.requests >= 1, "requests counted")
  vim.rpcrequest(child, "nvim_command", "M31RStatus")
  local out = vim.rpcrequest(child, "nvim_exec2", "messages", { output = true }).output
  check(out:find("M31R: daemon connected", 1, true), "message: " .. out)
end)

test(":M31RDisable makes m31r-lsp suppress completions", function()
  vim.rpcrequest(child, "nvim_command", "M31RDisable")
  local result = lua([[
    local c = vim.lsp.get_clients({ bufnr = 0, name = "m31r" })[1]
    local p = vim.lsp.util.make_position_params(0, c.offset_encoding)
    p.context = { triggerKind = 1 }
    local r = c:request_sync("textDocument/inlineCompletion", p, 10000, 0)
    return r and r.result
  ]])
  vim.rpcrequest(child, "nvim_command", "M31REnable")
  eq(result and result.items, {}, "items while disabled")
end)

test(":M31RRestart starts a new m31r-lsp", function()
  local old = lua("return vim.lsp.get_clients({ bufnr = 0, name = 'm31r' })[1].id")
  vim.rpcrequest(child, "nvim_command", "M31RRestart")
  wait_for("a new client", 30000, function()
    return lua([[
      local c = vim.lsp.get_clients({ bufnr = 0, name = "m31r" })[1]
      return c ~= nil and c.id ~= ... and c.initialized == true
    ]], old)
  end)
  type_and_wait("Gomap.in")
end)

cleanup()
finish()

--- m31r: Neovim client of m31r-lsp (offline Rust completion). `require("m31r").setup{}` starts the server
--- for Rust buffers, shows inline completions (native vim.lsp.inline_completion on Neovim >= 0.12, the
--- plugin's own ghost text on 0.11), maps accept/dismiss keys and defines the :M31R* commands.
local M = {}

--- Defaults; `setup(opts)` deep-merges `opts` over them. `settings` are m31r-lsp's configuration keys.
M.defaults = {
  cmd = { "m31r-lsp" },
  filetypes = { "rust" },
  root_markers = { "Cargo.toml", ".git" },
  settings = {
    enabled = true,
    languages = { "rust" },
    maxLines = 8,
    maxTokens = 128,
    socketPath = nil, -- nil: the daemon default $XDG_RUNTIME_DIR/m31r/m31rd.sock
    autoStart = true,
    daemonPath = "m31rd",
    daemonArgs = {},
    contextFiles = true,
    contextSnippets = true,
    contextSnippetBytes = 4096,
    firstLineBudgetMs = 100,
    speculativeNext = true,
    inlineTimeoutMs = 500,
    completionTimeoutMs = 1000,
    connectTimeoutMs = 2000,
    minConfidence = 0.7, -- m31r-lsp's DEFAULT_MIN_CONFIDENCE (lsp/src/config.rs)
    degenerateFilters = true,
  },
  --- nil: native vim.lsp.inline_completion when Neovim has it; false: always the plugin's ghost text.
  native = nil,
  debounce_ms = 75,
  keymaps = {
    accept = "<Tab>",
    accept_line = "<M-C-Right>",
    accept_word = "<M-Right>",
    dismiss = "<C-]>",
    trigger = "<M-\\>",
  },
}

M.config = vim.deepcopy(M.defaults)

local SETTING_KEYS = {
  "enabled",
  "languages",
  "maxLines",
  "maxTokens",
  "socketPath",
  "autoStart",
  "daemonPath",
  "daemonArgs",
  "contextFiles",
  "contextSnippets",
  "contextSnippetBytes",
  "firstLineBudgetMs",
  "speculativeNext",
  "inlineTimeoutMs",
  "completionTimeoutMs",
  "connectTimeoutMs",
  "minConfidence",
  "degenerateFilters",
}

--- The configuration object m31r-lsp gets (initializationOptions and settings.m31r): the contract's keys,
--- with an unset socketPath sent as JSON null.
function M.server_settings()
  local s = {}
  for _, key in ipairs(SETTING_KEYS) do
    s[key] = M.config.settings[key]
  end
  if s.socketPath == nil or s.socketPath == "" then
    s.socketPath = vim.NIL
  end
  return s
end

--- Whether this Neovim has the native inline completion (0.12+) and the user did not opt out.
function M.uses_native()
  return M.config.native ~= false and vim.lsp.inline_completion ~= nil
end

local function ghost()
  return require("m31r.ghost")
end

--- Accepts the shown completion (whole, its next line or next word); false when none is shown.
---@param kind? "whole"|"line"|"word"
function M.accept(kind)
  local buf = vim.api.nvim_get_current_buf()
  if M.uses_native() then
    -- Neovim's API accepts whole items only: line and word accept the whole item there.
    return vim.lsp.inline_completion.get({ bufnr = buf }) ~= false
  end
  return ghost().accept(buf, kind or "whole")
end

--- Hides the shown completion.
function M.dismiss()
  local buf = vim.api.nvim_get_current_buf()
  if M.uses_native() then
    -- Leaving the position is what dismisses a native candidate: re-enabling drops the current one.
    vim.lsp.inline_completion.enable(false, { bufnr = buf })
    vim.lsp.inline_completion.enable(M.config.settings.enabled, { bufnr = buf })
    return true
  end
  return ghost().dismiss(buf)
end

--- Asks for a completion now (triggerKind invoked).
function M.trigger()
  local buf = vim.api.nvim_get_current_buf()
  if M.uses_native() then
    vim.lsp.inline_completion.get({ bufnr = buf })
  else
    ghost().request(buf, 1)
  end
end

--- Whether a completion is displayed in the current buffer (own engine only; native: unknown, nil).
function M.visible()
  if M.uses_native() then
    return nil
  end
  return ghost().visible(vim.api.nvim_get_current_buf())
end

local function map_keys(buf)
  local km = M.config.keymaps
  local function expr_map(lhs, kind)
    if not lhs then
      return
    end
    vim.keymap.set("i", lhs, function()
      if M.uses_native() then
        return M.accept(kind) and "" or lhs
      end
      -- Edits are not allowed inside an expr mapping: accept through <Cmd>, or type the key itself.
      if ghost().visible(buf) then
        return ("<Cmd>lua require('m31r').accept(%q)<CR>"):format(kind)
      end
      return lhs
    end, { buffer = buf, expr = true, desc = "M31R: accept " .. kind })
  end
  expr_map(km.accept, "whole")
  expr_map(km.accept_line, "line")
  expr_map(km.accept_word, "word")
  if km.dismiss then
    vim.keymap.set("i", km.dismiss, function()
      if M.visible() == false then
        return km.dismiss
      end
      return "<Cmd>lua require('m31r').dismiss()<CR>"
    end, { buffer = buf, expr = true, desc = "M31R: dismiss" })
  end
  if km.trigger then
    vim.keymap.set("i", km.trigger, M.trigger, { buffer = buf, desc = "M31R: complete now" })
  end
end

local function on_attach(client, buf)
  if M.uses_native() then
    vim.lsp.inline_completion.enable(M.config.settings.enabled, { bufnr = buf, client_id = client.id })
  else
    ghost().attach(buf)
  end
  map_keys(buf)
end

--- Starts (or reuses) the m31r-lsp client for `buf`.
function M.start(buf)
  buf = buf or vim.api.nvim_get_current_buf()
  local settings = M.server_settings()
  local name = vim.api.nvim_buf_get_name(buf)
  local root = vim.fs.root(buf, M.config.root_markers) or (name ~= "" and vim.fs.dirname(name)) or vim.fn.getcwd()
  return vim.lsp.start({
    name = "m31r",
    cmd = M.config.cmd,
    root_dir = root,
    init_options = settings,
    settings = { m31r = settings },
    on_attach = on_attach,
  }, {
    bufnr = buf,
    -- One server for every root: it keeps one daemon connection and its caches.
    reuse_client = function(client, config)
      return client.name == config.name
    end,
  })
end

--- The m31r-lsp clients that are running.
function M.clients()
  return vim.lsp.get_clients({ name = "m31r" })
end

local function push_settings()
  local settings = M.server_settings()
  for _, client in ipairs(M.clients()) do
    client.settings = { m31r = settings }
    client:notify("workspace/didChangeConfiguration", { settings = client.settings })
    if M.uses_native() then
      for buf in pairs(client.attached_buffers) do
        vim.lsp.inline_completion.enable(settings.enabled, { bufnr = buf, client_id = client.id })
      end
    end
  end
  if not settings.enabled then
    for _, client in ipairs(M.clients()) do
      for buf in pairs(client.attached_buffers) do
        if not M.uses_native() then
          ghost().dismiss(buf)
        end
      end
    end
  end
end

--- Turns completions on or off (also tells m31r-lsp, which then suppresses them).
function M.set_enabled(enabled)
  M.config.settings.enabled = enabled
  push_settings()
end

--- Formats an m31r/status result for :M31RStatus.
function M.format_status(st)
  local function opt(v, fmt)
    return (v == nil or v == vim.NIL) and "n/a" or fmt:format(v)
  end
  return table.concat({
    ("M31R: daemon %s (%s)"):format(st.connected and "connected" or "unreachable", st.socket),
    ("model: %s"):format((st.model == nil or st.model == vim.NIL) and "none loaded" or st.model),
    ("last latency: %s"):format(opt(st.lastLatencyMs, "%.0f ms")),
    ("cache hit rate: %s"):format(
      (st.cacheHitRate == nil or st.cacheHitRate == vim.NIL) and "n/a" or ("%.0f%%"):format(st.cacheHitRate * 100)
    ),
    ("requests: %d (suppressed %d)"):format(st.requests or 0, st.suppressed or 0),
    ("completions: %s, engine: %s"):format(
      M.config.settings.enabled and "enabled" or "disabled",
      M.uses_native() and "vim.lsp.inline_completion" or "m31r ghost text"
    ),
  }, "\n")
end

--- Asks m31r-lsp for `m31r/status`; returns the result table, or nil and an error message.
---@param timeout_ms? integer
function M.status(timeout_ms)
  local client = M.clients()[1]
  if not client then
    return nil, "m31r-lsp is not running (open a Rust file, or check :M31RLog)"
  end
  local response, err = client:request_sync("m31r/status", nil, timeout_ms or 2000)
  if not response then
    return nil, "m31r/status: " .. tostring(err)
  end
  if response.err then
    return nil, "m31r/status: " .. (response.err.message or vim.inspect(response.err))
  end
  return response.result
end

local function create_commands()
  local cmd = vim.api.nvim_create_user_command
  cmd("M31RStatus", function()
    local st, err = M.status()
    if not st then
      vim.notify(err, vim.log.levels.WARN)
      return
    end
    vim.notify(M.format_status(st), vim.log.levels.INFO)
  end, { desc = "M31R: show m31r-lsp and daemon status" })
  cmd("M31REnable", function()
    M.set_enabled(true)
  end, { desc = "M31R: enable inline completions" })
  cmd("M31RDisable", function()
    M.set_enabled(false)
  end, { desc = "M31R: disable inline completions" })
  cmd("M31RToggle", function()
    M.set_enabled(not M.config.settings.enabled)
  end, { desc = "M31R: toggle inline completions" })
  cmd("M31RRestart", function()
    local bufs = {}
    for _, client in ipairs(M.clients()) do
      for buf in pairs(client.attached_buffers) do
        table.insert(bufs, buf)
      end
      client:stop()
    end
    vim.defer_fn(function()
      for _, buf in ipairs(bufs) do
        if vim.api.nvim_buf_is_valid(buf) then
          M.start(buf)
        end
      end
    end, 500)
  end, { desc = "M31R: restart m31r-lsp" })
  cmd("M31RLog", function()
    vim.cmd.tabnew(vim.lsp.log.get_filename())
  end, { desc = "M31R: open the LSP log" })
end

--- Configures the plugin and starts m31r-lsp for buffers of `filetypes` (already open ones included).
function M.setup(opts)
  if vim.fn.has("nvim-0.11") == 0 then
    vim.notify("m31r: Neovim 0.11 or newer is required", vim.log.levels.ERROR)
    return
  end
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  vim.validate("cmd", M.config.cmd, "table")
  vim.validate("filetypes", M.config.filetypes, "table")
  vim.api.nvim_set_hl(0, "M31RGhostText", { link = "Comment", default = true })
  create_commands()
  local group = vim.api.nvim_create_augroup("m31r", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = M.config.filetypes,
    callback = function(args)
      M.start(args.buf)
    end,
  })
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) and vim.tbl_contains(M.config.filetypes, vim.bo[buf].filetype) then
      M.start(buf)
    end
  end
end

return M

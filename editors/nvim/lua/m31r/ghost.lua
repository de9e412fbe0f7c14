--- m31r.ghost: the plugin's own inline-completion engine for Neovim 0.11 (0.12 has vim.lsp.inline_completion):
--- asks m31r-lsp for textDocument/inlineCompletion while the user types, shows the first item as ghost text
--- (an extmark: inline virtual text on the cursor line, virtual lines below), accepts it whole, by line or
--- by word, and dismisses it.
local text = require("m31r.text")

local M = {}

--- Extmark namespace of the ghost text (tests look for extmarks here).
M.ns = vim.api.nvim_create_namespace("m31r_ghost")

local HL = "M31RGhostText"

---@class m31r.GhostState
---@field timer uv.uv_timer_t|nil debounce timer
---@field request {client: vim.lsp.Client, id: integer}|nil the request in flight
---@field shown {row: integer, col: integer, text: string, tail: integer}|nil what is displayed: at (row, col), `tail` bytes after the cursor that accepting the whole item replaces
---@field extmark integer|nil
---@field own_tick integer|nil changedtick after our own partial accept (that change must not clear the rest)
---@field render_tick integer|nil changedtick when the ghost text was drawn

---@type table<integer, m31r.GhostState>
local states = {}

local function resolve(buf)
  if buf == nil or buf == 0 then
    return vim.api.nvim_get_current_buf()
  end
  return buf
end

local function config()
  return require("m31r").config
end

local function client_for(buf)
  return vim.lsp.get_clients({ bufnr = buf, name = "m31r" })[1]
end

--- Byte column of an LSP `character` offset in `line`, in the client's position encoding.
local function byte_col(line, character, encoding)
  if encoding == "utf-8" then
    return math.min(character, #line)
  end
  local ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  return ok and col or math.min(character, #line)
end

local function cancel(st)
  if st.request then
    pcall(function()
      st.request.client:cancel_request(st.request.id)
    end)
    st.request = nil
  end
  if st.timer then
    st.timer:stop()
  end
end

--- Removes the ghost text of `buf` (the request in flight stays).
function M.clear(buf)
  buf = resolve(buf)
  local st = states[buf]
  if not st then
    return
  end
  if st.extmark and vim.api.nvim_buf_is_valid(buf) then
    pcall(vim.api.nvim_buf_del_extmark, buf, M.ns, st.extmark)
  end
  st.extmark = nil
  st.shown = nil
end

--- Whether ghost text is displayed in `buf`.
function M.visible(buf)
  buf = resolve(buf)
  local st = states[buf]
  return st ~= nil and st.shown ~= nil
end

--- The displayed ghost text of `buf`, or nil.
function M.current(buf)
  buf = resolve(buf)
  local st = states[buf]
  return st and st.shown and st.shown.text or nil
end

local function render(buf, st, row, col, display, tail)
  local first, rest = text.split(display)
  local virt_lines = {}
  for _, l in ipairs(rest) do
    table.insert(virt_lines, { { l, HL } })
  end
  if st.extmark then
    pcall(vim.api.nvim_buf_del_extmark, buf, M.ns, st.extmark)
  end
  st.extmark = vim.api.nvim_buf_set_extmark(buf, M.ns, row, col, {
    virt_text = { { first, HL } },
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
  st.shown = { row = row, col = col, text = display, tail = tail }
  st.render_tick = vim.api.nvim_buf_get_changedtick(buf)
end

local function in_insert_mode()
  return vim.api.nvim_get_mode().mode:sub(1, 1) == "i"
end

--- Shows the first item of an inlineCompletion result if the buffer and cursor are still where the request
--- was made; otherwise drops it (a newer request is coming).
local function on_result(buf, st, result, tick, row, col, encoding)
  if not vim.api.nvim_buf_is_valid(buf) or vim.api.nvim_get_current_buf() ~= buf or not in_insert_mode() then
    return
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  if vim.api.nvim_buf_get_changedtick(buf) ~= tick or cursor[1] - 1 ~= row or cursor[2] ~= col then
    return
  end
  local items = result and (result.items or result) or {}
  local item = items[1]
  if type(item) ~= "table" then
    M.clear(buf)
    return
  end
  local insert = item.insertText
  if type(insert) == "table" then -- a StringValue snippet: shown and inserted as its plain text
    insert = insert.value
  end
  if type(insert) ~= "string" then
    M.clear(buf)
    return
  end
  local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, true)[1]
  local start_col, end_col = col, col
  if item.range then
    if item.range.start.line ~= row then
      M.clear(buf)
      return
    end
    start_col = byte_col(line, item.range.start.character, encoding)
    if item.range["end"].line == row then
      end_col = byte_col(line, item.range["end"].character, encoding)
    end
  end
  local display = start_col <= col and text.remaining(insert, line:sub(start_col + 1, col)) or nil
  if not display then
    M.clear(buf)
    return
  end
  render(buf, st, row, col, display, math.max(0, end_col - col))
end

--- Asks m31r-lsp for a completion at the cursor of the current window (which must show `buf`).
---@param trigger_kind? integer 1 invoked, 2 automatic (default)
function M.request(buf, trigger_kind)
  buf = resolve(buf)
  local st = states[buf]
  local client = client_for(buf)
  if not st or not client or not config().settings.enabled or vim.api.nvim_get_current_buf() ~= buf then
    return
  end
  cancel(st)
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local encoding = client.offset_encoding
  local params = vim.lsp.util.make_position_params(0, encoding)
  params.context = { triggerKind = trigger_kind or 2 }
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local ok, id
  ok, id = client:request("textDocument/inlineCompletion", params, function(err, result)
    if st.request and st.request.id == id then
      st.request = nil
    end
    if err then
      vim.lsp.log.warn("m31r: inlineCompletion failed", err)
      return
    end
    on_result(buf, st, result, tick, row, col, encoding)
  end, buf)
  if ok and id then
    st.request = { client = client, id = id }
  end
end

local function schedule_request(buf)
  local st = states[buf]
  if not st then
    return
  end
  if st.timer then
    st.timer:stop()
  else
    st.timer = assert(vim.uv.new_timer())
  end
  st.timer:start(
    config().debounce_ms,
    0,
    vim.schedule_wrap(function()
      if vim.api.nvim_buf_is_valid(buf) and in_insert_mode() then
        M.request(buf, 2)
      end
    end)
  )
end

--- Keeps the ghost text while the user types what it shows (consuming it), else clears it; then asks again.
local function on_text_changed(buf)
  local st = states[buf]
  if not st then
    return
  end
  if st.own_tick and st.own_tick == vim.api.nvim_buf_get_changedtick(buf) then
    return
  end
  st.own_tick = nil
  local shown = st.shown
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local kept = false
  if shown and row == shown.row and col > shown.col then
    local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, true)[1]
    local rest = text.remaining(shown.text, line:sub(shown.col + 1, col))
    if rest then
      render(buf, st, row, col, rest, shown.tail)
      kept = true
    end
  end
  if not kept then
    M.clear(buf)
  end
  schedule_request(buf)
end

--- Inserts the whole ghost text, its next line or its next word; returns false when none is shown.
---@param kind? "whole"|"line"|"word"
function M.accept(buf, kind)
  buf = resolve(buf)
  local st = states[buf]
  local shown = st and st.shown
  if not st or not shown then
    return false
  end
  local chunk = shown.text
  if kind == "line" then
    chunk = text.next_line(shown.text)
  elseif kind == "word" then
    chunk = text.next_word(shown.text)
  end
  local whole = chunk == shown.text
  cancel(st)
  M.clear(buf)
  local row, col = shown.row, shown.col
  vim.api.nvim_buf_set_text(buf, row, col, row, whole and col + shown.tail or col, vim.split(chunk, "\n", { plain = true }))
  local erow, ecol = text.end_position(row, col, chunk)
  vim.api.nvim_win_set_cursor(0, { erow + 1, ecol })
  if not whole then
    render(buf, st, erow, ecol, shown.text:sub(#chunk + 1), shown.tail)
    st.own_tick = vim.api.nvim_buf_get_changedtick(buf)
  end
  return true
end

--- Hides the ghost text and cancels the request in flight; returns false when nothing was shown.
function M.dismiss(buf)
  buf = resolve(buf)
  local st = states[buf]
  if not st then
    return false
  end
  local was = st.shown ~= nil
  cancel(st)
  M.clear(buf)
  return was
end

--- Starts the engine for `buf`: typing in insert mode asks for completions; leaving insert mode or moving
--- away from the ghost text clears it.
function M.attach(buf)
  if states[buf] then
    return
  end
  states[buf] = {}
  local group = vim.api.nvim_create_augroup("m31r_ghost_" .. buf, { clear = true })
  -- The callbacks return nothing: a callback that returns true deletes its autocommand.
  local function on(events, callback)
    vim.api.nvim_create_autocmd(events, { group = group, buffer = buf, callback = callback })
  end
  on({ "TextChangedI", "TextChangedP" }, function()
    on_text_changed(buf)
  end)
  on("CursorMovedI", function()
    local st = states[buf]
    local shown = st and st.shown
    -- A move that comes with an edit is TextChangedI's to judge (typing what the ghost text shows).
    if not shown or st.render_tick ~= vim.api.nvim_buf_get_changedtick(buf) then
      return
    end
    local cursor = vim.api.nvim_win_get_cursor(0)
    if cursor[1] - 1 ~= shown.row or cursor[2] ~= shown.col then
      M.dismiss(buf)
    end
  end)
  on({ "InsertLeave", "BufLeave" }, function()
    M.dismiss(buf)
  end)
  on({ "BufUnload", "BufWipeout" }, function()
    M.detach(buf)
  end)
end

--- Stops the engine for `buf`.
function M.detach(buf)
  local st = states[buf]
  if not st then
    return
  end
  cancel(st)
  M.clear(buf)
  if st.timer then
    st.timer:close()
  end
  states[buf] = nil
  pcall(vim.api.nvim_del_augroup_by_name, "m31r_ghost_" .. buf)
end

return M

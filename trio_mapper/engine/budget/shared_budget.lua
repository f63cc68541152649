-- One lane's budget shared by every engine on an API key: the whole of its state, and every change to it.
--
-- Each call is one atomic step that reads, decides and writes (docs/ledger.md, "Shared budget"). The only
-- clock is Redis's own (TIME): engines on other hosts disagree about the time, so they send durations and
-- receive durations, never instants. Floats travel as strings (Redis truncates Lua numbers to integers).
--
-- KEYS[1]  the lane's state (hash)
-- KEYS[2]  reservations in flight (hash: id -> "tokens requests seq")
-- KEYS[3]  their expiry (sorted set: id -> Redis time when it stops counting as in flight), and the marks of
--          withdrawn charges (`withdrawn_mark`) until they lapse
-- KEYS[4]  claims of refused heads (hash: engine id -> "since tokens requests ends")
-- All four share one hash tag, so they live on one Cluster slot.
--
-- ARGV[1]  the operation: charge | apply (the queued operations only, answering each one's outcome) | peek
-- ARGV[2]  configured requests per minute      ARGV[3]  configured tokens per minute
-- ARGV[4]  period: the largest burst, in seconds of refill
-- ARGV[5]  this engine's id
-- ARGV[6]  idle expiry of the state, seconds (refreshed by every call)
-- ARGV[7]  the share of the limits kept for engines cut off from Redis that spend a local share (0 to 1: the
--          sum of their shares, from the heartbeats, `SharedBudget.reserved`)
-- ARGV[8]  how many queued operations follow, ARGV[9...] those, then the operation's own arguments (below)
--
-- Every reply starts with the lane as this step left it (see `view`), then the operation's answer.

local state_key, reservations_key, expiry_key, claims_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = ARGV[1]
local configured = {r = tonumber(ARGV[2]), t = tonumber(ARGV[3])}
local period = tonumber(ARGV[4])
local engine = ARGV[5]
local idle_expiry = tonumber(ARGV[6])
-- What the engines in touch with Redis may spend of the limits: the rest is kept for engines that lost Redis
-- and spend their share locally (`--budget-failure local-share`), or the key would be overspent by it. Only
-- the bucket (its refill and its burst) is scaled; what is learned about the key (limits, pace) is not.
local share = math.max(0.01, 1 - (tonumber(ARGV[7]) or 0))

-- The constants of the local meter's learning (trio_mapper/engine/budget/local.py explains each).
local INITIAL_BURST_SECONDS = 1.0
local RESTED_FRACTION = 0.9
local AIMD_DECREASE = 0.7
local AIMD_DECREASE_ISOLATED = 0.8
local REPEAT_GROWTH = 0.05
local AIMD_INCREASE = 0.02
local AIMD_INCREASE_PER_REPLY = 0.005
local AIMD_FLOOR = 0.01
-- A refused head's claim on the budget outlives its ready time by this much, then lapses: an engine that
-- died (or whose waiter gave up) does not hold the lane for longer than that.
local CLAIM_GRACE = 2.0
-- The longest pause honoured, as the engines' retry policy honours (retry.py, MAX_HONOURED_WAIT).
local MAX_PAUSE = 120.0
-- How long an engine's configured limits count after its last call (its heartbeats come every 2 s; a lane it
-- stopped using, or an engine gone, stops lowering the others' limits after this).
local CONFIG_SPAN = 60.0
local EPS = 1e-6

local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6

local raw = redis.call('HGETALL', state_key)
local s = {}
for i = 1, #raw, 2 do
    s[raw[i]] = raw[i + 1]
end

-- Lua's tostring keeps 14 digits: 0.1 ms at today's Unix times. %.17g round-trips a double exactly.
local function exact(x)
    return string.format('%.17g', x)
end

local function num(name, default)
    local value = s[name]
    if value == nil or value == '' then return default end
    return tonumber(value)
end

-- Engines on one key may be told different limits (a config not yet rolled out everywhere, a reload on one
-- engine): the lowest that any engine told in the last CONFIG_SPAN seconds is in force for all, or the one
-- told more would spend the difference (a review: 6.16x the smaller limit). Each engine's own is kept in
-- the state as `cfg:<engine id>` (written by `save`), and lapses once that engine has not called for
-- CONFIG_SPAN seconds.
local told = configured.r .. ' ' .. configured.t
for i = 1, #raw, 2 do
    local field = raw[i]
    if string.sub(field, 1, 4) == 'cfg:' and field ~= 'cfg:' .. engine then
        local r, t, at = string.match(raw[i + 1], '(%S+) (%S+) (%S+)')
        if tonumber(at) + CONFIG_SPAN < now then
            redis.call('HDEL', state_key, field)
        else
            configured.r = math.min(configured.r, tonumber(r))
            configured.t = math.min(configured.t, tonumber(t))
        end
    end
end

-- Redis's clock going back (a failover to a host whose clock is behind) would leave the bucket's times in
-- the future: the lane would refill nothing, and stay paused, for as long as the clock went back. Its times
-- go back with the clock. (A clock going forward cannot be told from idle time: a refill up to capacity.)
local last_now = num('now', nil)
local went_back = 0
if last_now ~= nil and now < last_now then went_back = last_now - now end

-- A lane seen for the first time (or after Redis lost its state) starts with one second of refill, as a
-- fresh local meter does: never full, so a restarted Redis cannot hand every engine a whole burst.
local st = {
    r = {level = num('level_r', nil), ts = num('ts_r', now), header = num('header_r', nil), pace = num('pace_r', nil),
         peak = num('peak_r', 0), decreased_at = num('decreased_at_r', 0), lowered_to = num('lowered_to_r', -1),
         learned = num('learned_r', configured.r / 60 * INITIAL_BURST_SECONDS), adjusted = num('adjusted_r', 0)},
    t = {level = num('level_t', nil), ts = num('ts_t', now), header = num('header_t', nil), pace = num('pace_t', nil),
         peak = num('peak_t', 0), decreased_at = num('decreased_at_t', 0), lowered_to = num('lowered_to_t', -1),
         learned = num('learned_t', configured.t / 60 * INITIAL_BURST_SECONDS), adjusted = num('adjusted_t', 0)},
}
local paused_until = num('paused_until', 0) - went_back
st.r.ts, st.t.ts = st.r.ts - went_back, st.t.ts - went_back
local seq = num('seq', 0)
local counters = {pauses = num('pauses', 0), decreases = num('decreases', 0)}

local function effective(dim)
    local limit = configured[dim]
    local header = st[dim].header
    if header ~= nil and header > 0 and header < limit then limit = header end
    return limit
end
local function pace(dim)
    local limit = effective(dim)
    local d = st[dim]
    if d.pace == nil or d.header ~= nil then return limit end
    return math.min(limit, d.pace)
end
local function capacity(dim)
    local p = pace(dim)
    local full = p * period / 60
    return math.min(full, math.max(st[dim].learned, p / 60 * INITIAL_BURST_SECONDS)) * share
end
-- The refill per second of what the engines in touch with Redis may spend.
local function refill(dim)
    return pace(dim) * share / 60
end
-- Refill up to now; a dimension drained by a pause has its clock in the future and stays empty until then.
for _, dim in ipairs({'r', 't'}) do
    local d = st[dim]
    local cap = capacity(dim)
    if d.level == nil then d.level = refill(dim) * INITIAL_BURST_SECONDS end
    if now > d.ts then
        d.level = math.min(cap, d.level + (now - d.ts) * refill(dim))
        d.ts = now
    end
    if d.level > cap then d.level = cap end
end

-- Reservations whose engine never settled them (it died) stop counting as in flight; their charge stays
-- spent and heals by refill, so nothing is ever credited twice.
local expired = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
    redis.call('HDEL', reservations_key, id)
    redis.call('ZREM', expiry_key, id)
end
-- Claims: every engine whose head was refused holds one, until it is granted or its claim lapses (its
-- engine died, or its waiter went away). The oldest claim of another engine is the one a charge must leave
-- room for: a head that keeps being refused grows old, so it is served next, however often others ask.
local oldest = nil
local mine = nil
local claims = redis.call('HGETALL', claims_key)
for i = 1, #claims, 2 do
    local since, tokens, requests, ends = string.match(claims[i + 1], '(%S+) (%S+) (%S+) (%S+)')
    since, ends = tonumber(since), tonumber(ends)
    if ends <= now then
        redis.call('HDEL', claims_key, claims[i])
    elseif claims[i] == engine then
        mine = {since = since}
    elseif oldest == nil or since < oldest.since then
        oldest = {since = since, t = tonumber(tokens), r = tonumber(requests)}
    end
end

local function save()
    redis.call('HSET', state_key,
        'level_r', exact(st.r.level), 'ts_r', exact(st.r.ts), 'learned_r', exact(st.r.learned),
        'adjusted_r', exact(st.r.adjusted), 'peak_r', exact(st.r.peak),
        'decreased_at_r', exact(st.r.decreased_at), 'lowered_to_r', exact(st.r.lowered_to),
        'level_t', exact(st.t.level), 'ts_t', exact(st.t.ts), 'learned_t', exact(st.t.learned),
        'adjusted_t', exact(st.t.adjusted), 'peak_t', exact(st.t.peak),
        'decreased_at_t', exact(st.t.decreased_at), 'lowered_to_t', exact(st.t.lowered_to),
        'paused_until', exact(paused_until), 'seq', exact(seq), 'now', exact(now),
        'cfg:' .. engine, told .. ' ' .. exact(now),
        'pauses', exact(counters.pauses), 'decreases', exact(counters.decreases))
    for _, dim in ipairs({'r', 't'}) do
        for _, field in ipairs({'header', 'pace'}) do
            local value = st[dim][field]
            if value == nil then
                redis.call('HDEL', state_key, field .. '_' .. dim)
            else
                redis.call('HSET', state_key, field .. '_' .. dim, exact(value))
            end
        end
    end
    for _, key in ipairs({state_key, reservations_key, expiry_key, claims_key}) do
        redis.call('EXPIRE', key, idle_expiry)
    end
end

-- The lane as this step leaves it: what the engine shows in its statistics and checks admission against.
local function view()
    local learned_r, learned_t = '', ''
    if st.r.pace ~= nil and st.r.header == nil then learned_r = tostring(pace('r')) end
    if st.t.pace ~= nil and st.t.header == nil then learned_t = tostring(pace('t')) end
    return {
        tostring(effective('r')), tostring(effective('t')),
        tostring(capacity('r')), tostring(capacity('t')),
        tostring(st.r.level), tostring(st.t.level),
        tostring(math.max(0, paused_until - now)),
        tostring(redis.call('HLEN', reservations_key)),
        learned_r, learned_t, tostring(counters.pauses), tostring(counters.decreases),
    }
end

local function reply(...)
    save()
    local out = view()
    for _, value in ipairs({...}) do
        table.insert(out, type(value) == 'number' and exact(value) or tostring(value))
    end
    return out
end

-- The operations. Each takes its arguments as a list of strings and changes the state in place; `save`
-- writes it once at the end of the call. A queued operation travels as one string, its words separated by
-- spaces, with '-' for an absent value.

-- Settling: the reservation leaves the in-flight set exactly once; a repeat (a retried call whose first
-- reply was lost, or a reservation that expired) changes nothing.
local function take(id)
    local held = redis.call('HGET', reservations_key, id)
    if not held then return nil end
    redis.call('HDEL', reservations_key, id)
    redis.call('ZREM', expiry_key, id)
    local tokens, requests, at = string.match(held, '(%S+) (%S+) (%S+)')
    return {t = tonumber(tokens), r = tonumber(requests), seq = tonumber(at)}
end

local function grow(dim, amount)
    -- Additive increase of a pace learned from 429s, clocked by replies (local.py `_grow`).
    local d = st[dim]
    if d.pace == nil or d.header ~= nil or amount <= 0 then return end
    local limit = effective(dim)
    local p = pace(dim)
    if p >= limit then return end
    local step = math.min(AIMD_INCREASE * amount / (p / 60), AIMD_INCREASE_PER_REPLY)
    d.pace = math.min(limit, p + step * math.max(d.peak, p))
end

-- refund ID: credited up to the bucket's capacity, so a refund never mints budget.
local function refund(a)
    local held = take(a[1])
    if held == nil then return 'settled' end
    for _, dim in ipairs({'t', 'r'}) do
        st[dim].level = math.min(capacity(dim), st[dim].level + held[dim])
    end
    return 'done'
end

-- withdraw ID TTL: a charge whose answer never reached its engine (the call timed out) is taken back. Sent
-- after it, but a charge held up in Redis's input (a frozen or overloaded server) may run after the
-- withdrawal: then the withdrawal's mark (`withdrawn_mark`, kept TTL seconds) makes that charge a no-op.
local function withdrawn_mark(id)
    return 'withdrawn:' .. id
end
local function withdraw(a)
    local outcome = refund(a)
    if outcome == 'settled' then
        redis.call('ZADD', expiry_key, now + tonumber(a[2]), withdrawn_mark(a[1]))
    end
    return outcome
end

-- settle ID USAGE_ERROR LIMIT_R LIMIT_T REMAINING_R REMAINING_T LEVEL_R LEVEL_T ADJUSTED_R ADJUSTED_T
--        RESTED_R RESTED_T ANSWERED
-- USAGE_ERROR: tokens to charge more (negative: to credit) from the reply's usage; LIMIT_* and REMAINING_*
-- the reply's x-ratelimit-* headers; LEVEL_* and ADJUSTED_* the engine's view right after the charge;
-- RESTED_* whether each dimension was nearly full before it; ANSWERED 1 when the upstream answered (usage
-- or headers), which grows a learned pace.
local function settle(a)
    local held = take(a[1])
    if held == nil then return 'settled' end
    local usage_error = tonumber(a[2]) or 0
    if usage_error ~= 0 then
        st.t.level = math.min(capacity('t'), st.t.level - usage_error)
        st.t.adjusted = st.t.adjusted + usage_error
    end
    local own = {r = held.r, t = held.t + usage_error}
    local limits = {r = tonumber(a[3]), t = tonumber(a[4])}
    local remaining = {r = tonumber(a[5]), t = tonumber(a[6])}
    local level_at = {r = tonumber(a[7]), t = tonumber(a[8])}
    local adjusted_at = {r = tonumber(a[9]), t = tonumber(a[10])}
    local rested = {r = a[11] == '1', t = a[12] == '1'}
    for _, dim in ipairs({'r', 't'}) do
        local d = st[dim]
        if limits[dim] ~= nil and limits[dim] > 0 then d.header = limits[dim] end
        if remaining[dim] ~= nil then
            -- The upstream's remaining just after it admitted this request against ours just after we
            -- charged it, less what corrections since already took: only ever lowers our view.
            local excess = (level_at[dim] - remaining[dim]) - (d.adjusted - adjusted_at[dim])
            if excess > 0 then
                d.level = d.level - excess
                d.adjusted = d.adjusted + excess
            end
            if rested[dim] and remaining[dim] + own[dim] > d.learned then
                d.learned = remaining[dim] + own[dim]
            end
        end
    end
    if a[13] == '1' then
        grow('t', own.t)
        grow('r', own.r)
    end
    return 'done'
end

-- pause SECONDS SCOPE ANSWERED: SCOPE names the budget ('tokens', 'requests', '-' for both); ANSWERED the
-- seq of the reservation whose reply was the 429 ('-' when unknown).
local function pause(a)
    local wait, scope, answered = math.min(tonumber(a[1]), MAX_PAUSE), a[2], tonumber(a[3])
    paused_until = math.max(paused_until, now + wait)
    counters.pauses = counters.pauses + 1
    local named = {}
    if string.find(scope, 'token') then table.insert(named, 't') end
    if string.find(scope, 'request') then table.insert(named, 'r') end
    if #named == 0 then named = {'t', 'r'} end
    for _, dim in ipairs(named) do
        local d = st[dim]
        d.level = math.min(d.level, 0)
        d.ts = math.max(d.ts, paused_until)
        -- Multiplicative decrease of a pace learned from 429s alone (local.py `_decrease`), at most once
        -- per overshoot: a 429 answering a request admitted before the last decrease is the same one.
        local at = answered or seq
        if d.header == nil and at > d.decreased_at then
            local p = pace(dim)
            local factor = AIMD_DECREASE_ISOLATED
            if p < d.lowered_to * (1 + REPEAT_GROWTH) then factor = AIMD_DECREASE end
            d.peak = p
            d.pace = math.max(AIMD_FLOOR * configured[dim], p * factor)
            d.decreased_at = seq
            d.lowered_to = d.pace
            counters.decreases = counters.decreases + 1
        end
    end
    return 'done'
end

-- charge TTL ID TOKENS REQUESTS [ID TOKENS REQUESTS ...]: the costs of an engine's waiters in their order,
-- charged from the first while they fit (a FIFO: one that does not fit stops the rest). Answers how many
-- were granted, the wait before the next would fit (0 if all were), then per grant: its seq, the levels
-- and `adjusted` after it, and whether each dimension was rested before it.
local function charge(a)
    local ttl = tonumber(a[1])
    local answer = {0, 0}
    -- Its engine gave up on this call and withdrew it already: nobody is waiting for the answer. A call's
    -- ids are withdrawn together (one queued batch, one script run), so its first one tells for all.
    if a[2] ~= nil and redis.call('ZSCORE', expiry_key, withdrawn_mark(a[2])) then
        return answer
    end
    for i = 2, #a, 3 do
        local id, cost_t, cost_r = a[i], tonumber(a[i + 1]), tonumber(a[i + 2])
        if cost_t > effective('t') or cost_r > effective('r') then
            -- Limits lowered since the engine checked (another engine's headers): never charged.
            if answer[1] == 0 then answer[2] = 'too_large' end
            return answer
        end
        if paused_until > now then
            answer[2] = paused_until - now
            return answer
        end
        -- Another engine's head, refused before this one, has a claim: leave it room, so that a flood of
        -- small requests elsewhere cannot starve it.
        local need_t, need_r = cost_t, cost_r
        if oldest ~= nil and (mine == nil or oldest.since < mine.since) then
            need_t, need_r = need_t + oldest.t, need_r + oldest.r
        end
        local wait = 0
        for dim, need in pairs({t = need_t, r = need_r}) do
            local d = st[dim]
            -- A cost bigger than the whole burst is charged, into debt, once the bucket is full.
            local target = math.min(need, capacity(dim))
            if d.level < target - EPS then
                wait = math.max(wait, (target - d.level) / refill(dim))
            end
        end
        if wait > 0 then
            if answer[1] == 0 then
                local since = mine and mine.since or now
                redis.call('HSET', claims_key, engine,
                    exact(since) .. ' ' .. exact(cost_t) .. ' ' .. exact(cost_r) .. ' ' .. exact(now + wait + CLAIM_GRACE))
            end
            answer[2] = wait
            return answer
        end
        local rested_t = st.t.level >= RESTED_FRACTION * capacity('t') and 1 or 0
        local rested_r = st.r.level >= RESTED_FRACTION * capacity('r') and 1 or 0
        st.t.level = st.t.level - cost_t
        st.r.level = st.r.level - cost_r
        seq = seq + 1
        if mine ~= nil then
            redis.call('HDEL', claims_key, engine)
            mine = nil
        end
        redis.call('HSET', reservations_key, id, cost_t .. ' ' .. cost_r .. ' ' .. seq)
        redis.call('ZADD', expiry_key, now + ttl, id)
        answer[1] = answer[1] + 1
        for _, value in ipairs({seq, st.t.level, st.r.level, st.t.adjusted, st.r.adjusted, rested_t, rested_r}) do
            table.insert(answer, value)
        end
    end
    return answer
end

local QUEUED = {refund = refund, settle = settle, pause = pause, withdraw = withdraw}

-- ARGV[8]: how many queued operations follow (refunds, settlements, pauses and withdrawals this engine made
-- since its last call on the lane), applied first, in order; then the main operation's arguments.
-- Each answers 'done', or 'settled' when its reservation was settled (or expired) already.
local queued = tonumber(ARGV[8])
local outcomes = {}
for i = 1, queued do
    local words = {}
    for word in string.gmatch(ARGV[8 + i], '%S+') do table.insert(words, word) end
    local name = table.remove(words, 1)
    local apply = QUEUED[name]
    if apply == nil then return redis.error_reply('unknown queued operation ' .. tostring(name)) end
    table.insert(outcomes, apply(words))
end
local rest = {}
for i = 9 + queued, #ARGV do table.insert(rest, ARGV[i]) end

if op == 'charge' then
    return reply(unpack(charge(rest)))
end
if op == 'apply' or op == 'peek' then
    return reply(unpack(outcomes))
end
return redis.error_reply('unknown operation ' .. tostring(op))

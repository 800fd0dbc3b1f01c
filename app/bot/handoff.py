"""The Redis side of delivery: key names and the scripts that decide who delivers an answer.

Keys (owned here; {dk} is a message's dedupe key, see app/web/wechat/dedupe.py, written with
its openid as the hash tag, and {openid} is the user's tag: app/bot/slots.py; every key of one
user, and so every key a script or transaction here touches, shares one Redis Cluster slot):
    xy:wx:st:{dk}          hash    state, until (ms), reply (JSON item), sealed (a reply holding
                                   a raw API key, encrypted: app/bot/sealed.py)
    xy:wx:rdy:{dk}         list    wake-up tokens for webhooks waiting on that message (BLPOP)
    xy:wx:sent:{dk}        set     indices of the items already pushed: a re-run skips them
    xy:wx:park:{openid}    list    JSON items waiting for 继续 (taken by UNPARK: the item taken
                                   becomes the taking message's passive reply, atomically)
    xy:wx:pending:{openid} set     dedupe keys of the user's messages still being answered
    xy:wx:nopush           string  WeChat answered 48001: this account has no customer-service API

States of xy:wx:st:{dk}: (none) → waiting (webhooks wait; until = the latest deadline) →
handed (they gave up: the job must push) ; ready (an answer for a passive reply) → passive
(replied; WeChat's retries get it again) ; pushing → pushed | parked. The job's FINISH and the
webhook's TAKE are each one script, so exactly one side delivers an answer.
"""

from __future__ import annotations

from app.bot import slots

NOPUSH = "xy:wx:nopush"
STATE_TTL = 86400
NOPUSH_TTL = 86400
WAKE_TTL = 60
WAKE_TOKENS = 4


def state_key(dk: str) -> str:
    """Name a message's delivery-state hash."""
    return f"xy:wx:st:{slots.message(dk)}"


def wake_key(dk: str) -> str:
    """Name a message's wake-up list."""
    return f"xy:wx:rdy:{slots.message(dk)}"


def sent_key(dk: str) -> str:
    """Name the set of a message's items already pushed."""
    return f"xy:wx:sent:{slots.message(dk)}"


def park_key(openid: str) -> str:
    """Name a user's parked-items list."""
    return f"xy:wx:park:{slots.user(openid)}"


def pending_key(openid: str) -> str:
    """Name the set of a user's messages still being answered."""
    return f"xy:wx:pending:{slots.user(openid)}"


# KEYS[1]=st; ARGV: until_ms, ttl -> {state, reply, sealed}: mark a webhook waiting unless decided
WAIT = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == false or s == 'waiting' or s == 'handed' then
  local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if tonumber(ARGV[1]) > u then redis.call('HSET', KEYS[1], 'until', ARGV[1]) end
  redis.call('HSET', KEYS[1], 'state', 'waiting')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'waiting', '', ''}
end
if s == 'ready' then redis.call('HSET', KEYS[1], 'state', 'passive'); s = 'passive' end
return {s, redis.call('HGET', KEYS[1], 'reply') or '', redis.call('HGET', KEYS[1], 'sealed') or ''}
"""

# KEYS[1]=st; ARGV: now_ms, give_up ('1': the caller stops waiting) -> {state, reply, sealed}
TAKE = """
local s = redis.call('HGET', KEYS[1], 'state') or ''
if s == 'ready' then redis.call('HSET', KEYS[1], 'state', 'passive'); s = 'passive' end
if ARGV[2] == '1' and s == 'waiting' and
   tonumber(redis.call('HGET', KEYS[1], 'until') or '0') <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'handed'); s = 'handed'
end
return {s, redis.call('HGET', KEYS[1], 'reply') or '', redis.call('HGET', KEYS[1], 'sealed') or ''}
"""

# KEYS[1]=st, KEYS[2]=rdy, KEYS[3]=park; ARGV: now_ms, can_passive, ttl, park_ttl, reply,
# items to park with a passive reply... -> 'passive' | 'push' | the state already decided
FINISH = """
local s = redis.call('HGET', KEYS[1], 'state')
if s and s ~= 'waiting' and s ~= 'handed' then return s end
local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local out = 'push'
if s == 'waiting' and u > tonumber(ARGV[1]) and ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'ready', 'reply', ARGV[5])
  for i = 6, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
  if #ARGV >= 6 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
  out = 'passive'
else
  redis.call('HSET', KEYS[1], 'state', 'pushing')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
for i = 1, 4 do redis.call('RPUSH', KEYS[2], 1) end
redis.call('EXPIRE', KEYS[2], 60)
return out
"""

# KEYS[1]=st of the message taking an item, KEYS[2]=park; ARGV: until_ms (0: no deadline), ttl,
# note (appended to a text item when more wait) -> {how, item}: 'taken' (the item is now the
# message's passive reply: its retries, and the webhook's late path, get the same one),
# 'passive' (taken by this message before), 'late' (the webhook's deadline passed by the
# store's clock: the item stays parked, never popped for an answer WeChat will not see),
# '' (nothing parked)
UNPARK = """
local due = tonumber(ARGV[1])
if due > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= due then
    return {'late', ''}
  end
end
if redis.call('HGET', KEYS[1], 'state') == 'passive' then
  local kept = redis.call('HGET', KEYS[1], 'reply')
  if kept and kept ~= '' then return {'passive', kept} end
end
local item = redis.call('LPOP', KEYS[2])
if not item then return {'', ''} end
if ARGV[3] ~= '' and redis.call('LLEN', KEYS[2]) > 0 then
  local ok, parsed = pcall(cjson.decode, item)
  if ok and type(parsed) == 'table' and parsed['t'] == 'text' and type(parsed['c']) == 'string' then
    parsed['c'] = parsed['c'] .. ARGV[3]
    item = cjson.encode(parsed)
  end
end
redis.call('HSET', KEYS[1], 'state', 'passive', 'reply', item)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'taken', item}
"""

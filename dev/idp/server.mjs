// ztlab-devidp: a development OpenID provider on 127.0.0.1, built on `oidc-provider`.
//
// Configured from one JSON file whose path is in $ZTLAB_DEVIDP_CONFIG (see configSchema
// below; dev/idp/launcher.py writes it). What it does:
//
// - authorization code flow only, PKCE (S256) required for every client, `nonce` passed into
//   the ID token; scopes `openid profile email groups offline_access`;
// - a real login page (`login` + `password` checked against the users file, which is re-read
//   on every lookup); `amr`/`acr` come from the user's record at login time; a disabled user
//   cannot log in, and `findAccount` returns nothing for them, so userinfo and the refresh
//   grant fail for tokens issued before they were disabled;
// - consent is granted automatically for every registered client (no consent page);
// - a refresh token is issued on every code exchange (no `offline_access`/`prompt=consent`
//   needed); `groups` is in the ID token and in the userinfo response;
// - the first key of the private JWKS signs, the others are only published (rotation);
// - sessions, grants and tokens are kept in `store_file` (JSON, mode 0600) when given, so
//   a restart (key rotation) keeps refresh tokens and browser sessions valid.
//
// Prints `ztlab-devidp ready <issuer>` once listening; exits 0 on SIGTERM/SIGINT.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

const READY_PREFIX = 'ztlab-devidp ready';
const SCOPES = ['openid', 'profile', 'email', 'groups', 'offline_access'];

function log(...parts) {
  process.stdout.write(`ztlab-devidp ${new Date().toISOString()} ${parts.join(' ')}\n`);
}

function fail(message) {
  process.stderr.write(`ztlab-devidp: ${message}\n`);
  process.exit(2);
}

// ---------------------------------------------------------------------------------------
// configuration

function positiveInt(value, name, fallback) {
  if (value === undefined || value === null) return fallback;
  if (!Number.isInteger(value) || value <= 0) fail(`config: ${name} must be a positive integer`);
  return value;
}

function loadConfig() {
  const file = process.env.ZTLAB_DEVIDP_CONFIG;
  if (!file) fail('set ZTLAB_DEVIDP_CONFIG to the path of the JSON configuration file');
  let raw;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    fail(`config: cannot read ${file}: ${err.message}`);
  }
  const configDir = path.dirname(path.resolve(file));
  const resolvePath = (p) => (p ? path.resolve(configDir, p) : undefined);

  const issuer = process.env.ZTLAB_DEVIDP_ISSUER || raw.issuer;
  if (typeof issuer !== 'string' || !/^https?:\/\//.test(issuer)) fail('config: issuer must be an http(s) URL');
  const issuerUrl = new URL(issuer);
  const port = positiveInt(
    process.env.ZTLAB_DEVIDP_PORT ? Number(process.env.ZTLAB_DEVIDP_PORT) : raw.port,
    'port',
    Number(issuerUrl.port) || 80,
  );
  const host = raw.host || issuerUrl.hostname.replace(/^\[|\]$/g, '');

  let { jwks } = raw;
  if (!jwks && raw.jwks_file) {
    try {
      jwks = JSON.parse(fs.readFileSync(resolvePath(raw.jwks_file), 'utf8'));
    } catch (err) {
      fail(`config: cannot read jwks_file ${raw.jwks_file}: ${err.message}`);
    }
  }
  if (!jwks || !Array.isArray(jwks.keys) || jwks.keys.length === 0) fail('config: jwks must be a private JWKS with at least one key');
  for (const key of jwks.keys) {
    if (!key.d) fail(`config: jwks key ${key.kid ?? '?'} is not a private key`);
  }
  const signingAlg = jwks.keys[0].alg || (jwks.keys[0].kty === 'EC' ? 'ES256' : 'RS256');

  const usersFile = resolvePath(raw.users_file);
  if (!usersFile) fail('config: users_file is required');

  if (!Array.isArray(raw.clients) || raw.clients.length === 0) fail('config: clients must be a non-empty list');
  const clients = raw.clients.map((c, i) => {
    if (!c.client_id || !c.client_secret) fail(`config: clients[${i}] needs client_id and client_secret`);
    if (!Array.isArray(c.redirect_uris) || c.redirect_uris.length === 0) fail(`config: clients[${i}].redirect_uris must be a non-empty list`);
    return {
      client_id: c.client_id,
      client_secret: c.client_secret,
      client_name: c.client_name,
      redirect_uris: c.redirect_uris,
      post_logout_redirect_uris: c.post_logout_redirect_uris ?? [],
      grant_types: c.grant_types ?? ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
      id_token_signed_response_alg: c.id_token_signed_response_alg ?? signingAlg,
    };
  });

  const cookieKeys = raw.cookie_keys ?? [crypto.randomBytes(32).toString('base64url')];
  if (!Array.isArray(cookieKeys) || cookieKeys.length === 0) fail('config: cookie_keys must be a non-empty list of strings');

  const refreshTtl = positiveInt(raw.refresh_token_ttl, 'refresh_token_ttl', 14 * 24 * 3600);
  const sessionTtl = positiveInt(raw.session_ttl, 'session_ttl', 24 * 3600);
  return {
    issuer: issuer.replace(/\/$/, ''),
    host,
    port,
    clients,
    jwks: { keys: jwks.keys },
    usersFile,
    storeFile: resolvePath(raw.store_file),
    cookieKeys,
    ttl: {
      IdToken: positiveInt(raw.id_token_ttl, 'id_token_ttl', 3600),
      AccessToken: positiveInt(raw.access_token_ttl, 'access_token_ttl', 3600),
      RefreshToken: refreshTtl,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: sessionTtl,
      Grant: Math.max(refreshTtl, sessionTtl),
    },
    acrValues: raw.acr_values ?? ['urn:ztlab:mfa', 'urn:ztlab:pwd'],
    logRequests: Boolean(raw.log_requests),
  };
}

// ---------------------------------------------------------------------------------------
// the users file: {"alice": {"password": "...", "email": ..., "groups": [...], ...}}

function readUsers(usersFile) {
  try {
    const users = JSON.parse(fs.readFileSync(usersFile, 'utf8'));
    return users && typeof users === 'object' ? users : {};
  } catch (err) {
    log(`cannot read users file ${usersFile}: ${err.message}`);
    return {};
  }
}

function lookupUser(usersFile, name) {
  const users = readUsers(usersFile);
  if (typeof name !== 'string' || !Object.hasOwn(users, name)) return undefined;
  const user = users[name];
  return user && typeof user === 'object' ? user : undefined;
}

function safeEqual(a, b) {
  const ha = crypto.createHash('sha256').update(String(a)).digest();
  const hb = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(ha, hb);
}

function passwordMatches(user, password) {
  if (typeof user.password_sha256 === 'string') {
    const digest = crypto.createHash('sha256').update(password, 'utf8').digest('hex');
    return safeEqual(digest, user.password_sha256.toLowerCase());
  }
  if (typeof user.password === 'string') return safeEqual(password, user.password);
  return false;
}

function asStringList(value) {
  return Array.isArray(value) ? value.filter((v) => typeof v === 'string') : [];
}

function accountFor(usersFile, name) {
  const user = lookupUser(usersFile, name);
  if (!user || user.disabled) return undefined;
  return {
    accountId: name,
    // findAccount runs on every userinfo call and token grant, and reads the file afresh:
    // group/email/name changes show on the next userinfo call or refresh
    async claims() {
      const current = user;
      const claims = {
        sub: name,
        preferred_username: name,
        groups: asStringList(current.groups),
      };
      if (current.name) claims.name = current.name;
      if (current.email) {
        claims.email = current.email;
        claims.email_verified = current.email_verified ?? true;
      }
      return claims;
    },
  };
}

// ---------------------------------------------------------------------------------------
// a small persistent adapter: everything in memory, mirrored to one JSON file (mode 0600)

const FLUSH_DELAY_MS = 100;

class FileStore {
  constructor(file) {
    this.file = file;
    this.timer = undefined;
    this.entries = new Map();
    if (file && fs.existsSync(file)) {
      try {
        const data = JSON.parse(fs.readFileSync(file, 'utf8'));
        for (const [key, entry] of Object.entries(data.entries ?? {})) this.entries.set(key, entry);
      } catch (err) {
        log(`store ${file} unreadable, starting empty: ${err.message}`);
      }
    }
  }

  get(key) {
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    if (entry.exp && entry.exp <= Date.now()) {
      this.entries.delete(key);
      return undefined;
    }
    return entry.v;
  }

  set(key, value, expiresAtMs) {
    this.entries.set(key, { v: value, exp: expiresAtMs ?? null });
  }

  delete(key) {
    this.entries.delete(key);
  }

  // writes are coalesced: at most one rewrite of the file per FLUSH_DELAY_MS
  scheduleFlush() {
    if (!this.file || this.timer) return;
    this.timer = setTimeout(() => this.flush(), FLUSH_DELAY_MS);
  }

  flush() {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    if (!this.file) return;
    const now = Date.now();
    const out = {};
    for (const [key, entry] of this.entries) {
      if (!entry.exp || entry.exp > now) out[key] = entry;
      else this.entries.delete(key);
    }
    const tmp = `${this.file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify({ entries: out }), { mode: 0o600 });
    fs.renameSync(tmp, this.file);
  }
}

const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);

function makeAdapter(store) {
  return class StoreAdapter {
    constructor(model) {
      this.model = model;
    }

    key(id) {
      return `${this.model}:${id}`;
    }

    async upsert(id, payload, expiresIn) {
      const exp = typeof expiresIn === 'number' ? Date.now() + (expiresIn + 15) * 1000 : null;
      const key = this.key(id);
      store.set(key, payload, exp);
      if (this.model === 'Session' && payload.uid) store.set(`sessionUid:${payload.uid}`, id, exp);
      if (payload.userCode) store.set(`userCode:${payload.userCode}`, id, exp);
      if (GRANTABLE.has(this.model) && payload.grantId) {
        const members = store.get(`grant:${payload.grantId}`) ?? [];
        if (!members.includes(key)) members.push(key);
        store.set(`grant:${payload.grantId}`, members, null);
      }
      store.scheduleFlush();
    }

    async find(id) {
      return store.get(this.key(id));
    }

    async findByUid(uid) {
      const id = store.get(`sessionUid:${uid}`);
      return id ? this.find(id) : undefined;
    }

    async findByUserCode(userCode) {
      const id = store.get(`userCode:${userCode}`);
      return id ? this.find(id) : undefined;
    }

    async consume(id) {
      const payload = store.get(this.key(id));
      if (payload) {
        payload.consumed = Math.floor(Date.now() / 1000);
        store.scheduleFlush();
      }
    }

    async destroy(id) {
      store.delete(this.key(id));
      store.scheduleFlush();
    }

    async revokeByGrantId(grantId) {
      for (const key of store.get(`grant:${grantId}`) ?? []) store.delete(key);
      store.delete(`grant:${grantId}`);
      store.scheduleFlush();
    }
  };
}

// ---------------------------------------------------------------------------------------
// pages

function esc(value) {
  return String(value ?? '')
    .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}
label{display:block;margin-top:.8rem}input{width:100%;padding:.4rem;box-sizing:border-box}
button{margin-top:1rem;padding:.5rem 1rem}.error{color:#b00020}.note{color:#666;font-size:.85rem}
</style>
</head>
<body>
${body}
</body>
</html>`;
}

function loginPage({ clientName, login = '', error }) {
  return page('Sign in - ztlab development IdP', `<h1>Sign in</h1>
<p class="note">zerotrust-lab development identity provider${clientName ? ` &middot; signing in to ${esc(clientName)}` : ''}</p>
${error ? `<p class="error" id="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" autocomplete="off">
<label for="login">Username</label>
<input id="login" name="login" type="text" value="${esc(login)}" autofocus required>
<label for="password">Password</label>
<input id="password" name="password" type="password" required>
<button type="submit" id="submit" name="submit" value="login">Sign in</button>
</form>`);
}

async function readForm(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

// ---------------------------------------------------------------------------------------
// the provider

async function importProvider() {
  const dir = process.env.ZTLAB_DEVIDP_NODE_MODULES;
  if (!dir) return (await import('oidc-provider')).default;
  const pkgDir = path.join(dir, 'oidc-provider');
  const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));
  return (await import(pathToFileURL(path.join(pkgDir, pkg.main || 'lib/index.js')).href)).default;
}

async function main() {
  const config = loadConfig();
  const Provider = await importProvider();
  const store = new FileStore(config.storeFile);
  store.flush();
  const clientNames = new Map(config.clients.map((c) => [c.client_id, c.client_name || c.client_id]));

  const provider = new Provider(config.issuer, {
    adapter: makeAdapter(store),
    clients: config.clients,
    jwks: config.jwks,
    cookies: {
      keys: config.cookieKeys,
      // 127.0.0.1 cookies are shared between ports: keep ours apart from the hub's
      names: {
        session: 'ztlab_devidp_session',
        interaction: 'ztlab_devidp_interaction',
        resume: 'ztlab_devidp_resume',
      },
      long: { httpOnly: true, sameSite: 'lax' },
      short: { httpOnly: true, sameSite: 'lax' },
    },
    scopes: SCOPES,
    claims: {
      // acr/amr ride with `openid`: they are in every ID token (they come from the login,
      // not from the account, so userinfo does not repeat them)
      openid: ['sub', 'acr', 'amr'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
      auth_time: null,
      sid: null,
      iss: null,
    },
    acrValues: config.acrValues,
    // groups/amr/acr belong in the ID token too, not only at the userinfo endpoint
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
    pkce: { required: () => true },
    ttl: config.ttl,
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      rpInitiatedLogout: { enabled: true },
    },
    clientBasedCORS: () => false,
    findAccount: async (ctx, sub) => accountFor(config.usersFile, sub),
    // refresh tokens on every code exchange for clients allowed the grant
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    // tokens live their own TTL, not the IdP browser session's
    expiresWithSession: async () => false,
    // consent: granted automatically for registered clients (there are no others)
    loadExistingGrant: async (ctx) => {
      const { oidc } = ctx;
      const accountId = oidc.account.accountId;
      const clientId = oidc.client.clientId;
      const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(clientId);
      let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
      if (!grant || grant.accountId !== accountId || grant.clientId !== clientId) {
        grant = new oidc.provider.Grant({ accountId, clientId });
      }
      const scopes = [...oidc.requestParamOIDCScopes].filter((s) => SCOPES.includes(s));
      if (scopes.length) grant.addOIDCScope(scopes.join(' '));
      const claims = [...oidc.requestParamClaims];
      if (claims.length) grant.addOIDCClaims(claims);
      await grant.save();
      return grant;
    },
    interactions: {
      url: (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    renderError: async (ctx, out, error) => {
      ctx.type = 'html';
      ctx.body = page('Error - ztlab development IdP', `<h1>Error</h1>
<p class="error" id="error">${esc(out.error)}: ${esc(out.error_description)}</p>`);
      if (error?.status >= 500 || !error?.status) log('error', error?.stack ?? String(error));
    },
  });

  provider.on('server_error', (ctx, err) => log('server_error', err?.stack ?? String(err)));
  for (const event of ['grant.error', 'authorization.error', 'userinfo.error', 'introspection.error', 'revocation.error']) {
    provider.on(event, (ctx, err) => log(event, ctx?.oidc?.client?.clientId ?? '-', `${err.error ?? err.name}: ${err.error_description ?? err.message}`));
  }
  provider.on('grant.success', (ctx) => log('grant.success', ctx.oidc.params?.grant_type ?? '-', ctx.oidc.client?.clientId ?? '-', ctx.oidc.account?.accountId ?? '-'));

  // the interactions: a real login form; any other prompt is answered without a page
  provider.use(async (ctx, next) => {
    const m = /^\/interaction\/([A-Za-z0-9_-]+)(\/abort)?\/?$/.exec(ctx.path);
    if (config.logRequests) log(ctx.method, ctx.path);
    if (!m) return next();
    ctx.set('Cache-Control', 'no-store');
    ctx.set('X-Frame-Options', 'DENY');
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== m[1]) throw new Error('interaction mismatch');
    const { prompt, params } = details;
    const clientName = clientNames.get(params.client_id);

    if (m[2]) {
      await provider.interactionFinished(ctx.req, ctx.res, {
        error: 'access_denied', error_description: 'the user cancelled the sign-in',
      }, { mergeWithLastSubmission: false });
      ctx.respond = false;
      return undefined;
    }

    if (prompt.name !== 'login') {
      // consent for a registered client: grant what was asked for and carry on
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
      const d = prompt.details ?? {};
      if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
      if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
      for (const [indicator, scopes] of Object.entries(d.missingResourceScopes ?? {})) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
      const grantId = await grant.save();
      await provider.interactionFinished(ctx.req, ctx.res, { consent: { grantId } }, { mergeWithLastSubmission: true });
      ctx.respond = false;
      return undefined;
    }

    if (ctx.method === 'GET') {
      ctx.type = 'html';
      ctx.body = loginPage({ clientName, login: params.login_hint });
      return undefined;
    }
    if (ctx.method !== 'POST') {
      ctx.status = 405;
      return undefined;
    }

    const form = await readForm(ctx.req);
    const login = form.get('login') ?? '';
    const password = form.get('password') ?? '';
    const user = lookupUser(config.usersFile, login);
    let error;
    if (!user || !passwordMatches(user, password)) {
      error = 'Invalid username or password.';
    } else if (user.disabled) {
      error = 'This account is disabled.';
    }
    if (error) {
      log('login.failed', login || '-', error);
      ctx.status = 200;
      ctx.type = 'html';
      ctx.body = loginPage({ clientName, login, error });
      return undefined;
    }

    const amr = asStringList(user.amr);
    const result = {
      login: {
        accountId: login,
        amr: amr.length ? amr : ['pwd'],
        ...(typeof user.acr === 'string' ? { acr: user.acr } : {}),
        remember: true,
      },
    };
    log('login.success', login, `amr=${result.login.amr.join(',')}`, `acr=${user.acr ?? '-'}`);
    await provider.interactionFinished(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
    ctx.respond = false;
    return undefined;
  });

  const server = http.createServer(provider.callback());
  server.on('error', (err) => fail(`cannot listen on ${config.host}:${config.port}: ${err.message}`));

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    log(`${signal} received, stopping`);
    try {
      store.flush();
    } catch (err) {
      log('cannot flush store', err.message);
    }
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (process.env.ZTLAB_DEVIDP_EXIT_WITH_PARENT) {
    // the launcher holds our stdin open: when it goes away (even killed), so do we
    process.stdin.on('end', () => stop('stdin closed'));
    process.stdin.on('error', () => stop('stdin closed'));
    process.stdin.resume();
  }

  server.listen(config.port, config.host, () => {
    log(`listening on ${config.host}:${config.port}, signing with ${config.jwks.keys[0].kid ?? 'key 0'} (${config.jwks.keys.length} keys published)`);
    process.stdout.write(`${READY_PREFIX} ${config.issuer}\n`);
  });
}

main().catch((err) => fail(err?.stack ?? String(err)));

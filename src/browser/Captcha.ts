/**
 * Captcha detection from DOM markers: reCAPTCHA v2 (checkbox and invisible), reCAPTCHA v3,
 * hCaptcha, Cloudflare Turnstile, the Cloudflare interstitial challenge, and selectors a
 * recipe names (`custom`). The markers are the vendors' own widget containers and the URLs
 * of their scripts and iframes, read from the page's main document (a vendor's iframe is an
 * element there even when its contents are cross-origin).
 *
 * `captcha_type` keeps to the values the client app knows (`recaptcha_v2`, `recaptcha_v3`,
 * `hcaptcha`, `cloudflare_turnstile`, `custom`); `kind` says which variant was seen.
 */
import { Schema } from "effect"
import type { Page } from "playwright-core"

/** What was seen, and where. */
export interface Detected {
  readonly kind:
    | "recaptcha_v2_checkbox"
    | "recaptcha_v2_invisible"
    | "recaptcha_v3"
    | "hcaptcha"
    | "turnstile"
    | "cloudflare_challenge"
    | "custom"
  readonly captcha_type: "recaptcha_v2" | "recaptcha_v3" | "hcaptcha" | "cloudflare_turnstile" | "custom"
  readonly element_selector: string
  readonly difficulty: "easy" | "medium" | "hard"
}

/** Look for a captcha on the page; `custom` selectors are tried first. Undefined when none. */
export const detect = async (page: Page, custom: ReadonlyArray<string> = []): Promise<Detected | undefined> => {
  const found = decodeFound(await page.evaluate(`(${inPage})(${JSON.stringify(custom)})`))
  return found === null ? undefined : { ...found, ...classes[found.kind] }
}

// --- internal ---

const Found = Schema.NullOr(
  Schema.Struct({
    kind: Schema.Literal(
      "recaptcha_v2_checkbox",
      "recaptcha_v2_invisible",
      "recaptcha_v3",
      "hcaptcha",
      "turnstile",
      "cloudflare_challenge",
      "custom"
    ),
    element_selector: Schema.String
  })
)
const decodeFound = Schema.decodeUnknownSync(Found)

const classes: Record<Detected["kind"], Pick<Detected, "captcha_type" | "difficulty">> = {
  recaptcha_v2_checkbox: { captcha_type: "recaptcha_v2", difficulty: "medium" },
  recaptcha_v2_invisible: { captcha_type: "recaptcha_v2", difficulty: "easy" },
  recaptcha_v3: { captcha_type: "recaptcha_v3", difficulty: "easy" },
  hcaptcha: { captcha_type: "hcaptcha", difficulty: "hard" },
  turnstile: { captcha_type: "cloudflare_turnstile", difficulty: "easy" },
  cloudflare_challenge: { captcha_type: "custom", difficulty: "medium" },
  custom: { captcha_type: "custom", difficulty: "medium" }
}

/**
 * Runs in the page (plain JavaScript, as the page sees it): the first marker found, most
 * specific first; `null` when none. A string, as this project compiles without the DOM's types.
 */
const inPage = String.raw`(custom) => {
  const visible = (el) => {
    const r = el.getBoundingClientRect?.()
    return r === undefined || r.width > 0 || r.height > 0
  }
  const first = (selector) => {
    try {
      return document.querySelector(selector)
    } catch {
      return null
    }
  }
  for (const selector of custom) if (first(selector) !== null) return { kind: "custom", element_selector: selector }
  // The Cloudflare interstitial ("Just a moment…"): the whole page is the challenge.
  for (const selector of ["#challenge-form", "#challenge-stage", "#cf-challenge-running", "#challenge-running"]) {
    if (first(selector) !== null) return { kind: "cloudflare_challenge", element_selector: selector }
  }
  if (/^just a moment/i.test(document.title) && first('script[src*="/cdn-cgi/challenge-platform/"]') !== null) {
    return { kind: "cloudflare_challenge", element_selector: 'script[src*="/cdn-cgi/challenge-platform/"]' }
  }
  const turnstile = ['iframe[src*="challenges.cloudflare.com"]', ".cf-turnstile"]
  for (const selector of turnstile) if (first(selector) !== null) return { kind: "turnstile", element_selector: selector }
  for (const selector of ['iframe[src*="hcaptcha.com"]', ".h-captcha"]) {
    if (first(selector) !== null) return { kind: "hcaptcha", element_selector: selector }
  }
  const invisible = ['.g-recaptcha[data-size="invisible"]', 'iframe[src*="/recaptcha/"][src*="size=invisible"]']
  for (const selector of invisible) if (first(selector) !== null) return { kind: "recaptcha_v2_invisible", element_selector: selector }
  const anchor = first('iframe[src*="/recaptcha/api2/anchor"], iframe[src*="/recaptcha/enterprise/anchor"]')
  if (anchor !== null && visible(anchor)) return { kind: "recaptcha_v2_checkbox", element_selector: 'iframe[src*="/recaptcha/"][src*="anchor"]' }
  if (first(".g-recaptcha") !== null) return { kind: "recaptcha_v2_checkbox", element_selector: ".g-recaptcha" }
  // v3: the script loaded with a site key (\`render=<key>\`), or its badge; no widget to click.
  for (const selector of ['script[src*="/recaptcha/api.js?render="]', 'script[src*="/recaptcha/enterprise.js?render="]', ".grecaptcha-badge"]) {
    const el = first(selector)
    if (el !== null && !(el.getAttribute("src") ?? "").includes("render=explicit"))
      return { kind: "recaptcha_v3", element_selector: selector }
  }
  return null
}`

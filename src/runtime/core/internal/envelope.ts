/**
 * A message on its way to a local actor: a mailbox row (claimed, or carried by its wake-up
 * NOTIFY) as the inbox hands it to the actor's queue.
 */
import type * as MailboxStorage from "../MailboxStorage.ts"

/** A tell or an ask for a local actor. */
export interface Envelope {
  readonly rowId: string
  readonly messageId: string
  readonly actorId: string
  readonly kind: "tell" | "ask"
  readonly sender: string
  readonly replyTo: string | null
  readonly body: unknown
}

/** The envelope of a row that is not a reply. */
export const fromRow = (row: MailboxStorage.InboundRow): Envelope => ({
  rowId: row.id,
  messageId: row.message_id,
  actorId: row.actor_id!,
  kind: row.kind as "tell" | "ask",
  sender: row.sender,
  replyTo: row.reply_to,
  body: row.body
})

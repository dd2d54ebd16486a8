-- A room's stream is now two tables sharing its offsets: a message's own event ('message')
-- is its row in messages, at messages.seq, and room_events holds only the events about
-- messages ('edit', 'delete', 'removed', 'restored'). The store reads the stream as the
-- two merged by offset. Every offset still comes from rooms.last_offset, taken under the
-- room's write lock, so each offset is used once across both tables and the stream stays
-- gap-free. The 'message' rows repeated what messages holds, and cost a second index entry
-- per message in every append (about a third of SQLite's writes); they are dropped here.
DELETE FROM room_events WHERE kind = 'message';
